"""TunerLayer: what every adapter layer shares (PEFT's BaseTunerLayer), so that a tuner writes only its math.

A layer wraps `base_layer` and keeps per-adapter state in dicts keyed by adapter name: `adapter_layer_names`
(ModuleDicts / ParameterDicts of trainable parts, PEFT's parameter names) and `other_param_names` (plain dicts).

State that is derived, never saved, and dropped by the events that change it:
- `_plans`: the layer's launch plans (what forward runs, decided once per `plan_key`), built by `make_plan`.
- the tuner's value caches, cleared by `_clear_caches` (e.g. DoRA's eval scale, mixed-batch stacks).
- the base view's caches (`base_view.clear()`), for values derived from the frozen base weight.
Events: adding, loading, deleting or activating adapters, enabling/disabling, merging and unmerging, train() /
eval(), moves and casts (`_apply`: .to(), .cuda(), .half(), ...). Caches of values keyed on parameter versions
(optimizer steps) check those themselves.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from ..bases import BaseView, linear_view
from ..bases.view import has_hooks
from ..batching import batch_for
from ..kernels import settings
from ..kernels.common.backend import keeps_no_state
from . import merging


def check_adapter_names(x: torch.Tensor, adapter_names: list[str]) -> None:
    slots = getattr(adapter_names, "sample_slots", None)
    n = slots.shape[0] if slots is not None else len(adapter_names)  # symbolic under torch.compile
    if len(x) != n:
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(adapter_names)} and {len(x)} respectively.")


def _set_requires_grad(module, flag: bool) -> None:
    for p in module.parameters() if isinstance(module, nn.Module) else [module]:
        p.requires_grad_(flag)


def invalidate_after_load(layer: nn.Module, incompatible_keys) -> None:
    """A load_state_dict post hook (also on PEFT layers adopted by peft_interop, which lack the method)."""
    TunerLayer.invalidate(layer, base=True)


class TunerLayer(nn.Module):
    _batch_key = None  # set by the owning TunerModel: which model's mixed batches reach this layer
    adapter_layer_names: tuple[str, ...] = ()  # dicts of trainable parts keyed by adapter name
    other_param_names: tuple[str, ...] = ()  # plain dicts keyed by adapter name
    extra_adapter_dicts: tuple[str, ...] = ()  # more per-adapter dicts, dropped with the adapter
    # PEFT file keys that do not follow "<dict>.<param>" with the adapter name dropped (e.g. DoRA's magnitude).
    file_key_renames: dict[str, str] = {}
    # Per-adapter dicts of which the model holds one object, shared by all its layers (VeRA's projections). PEFT
    # saves an adapter's entry once, as `base_model.<dict>`, and only when the dict's buffers are persistent.
    shared_adapter_dicts: tuple[str, ...] = ()
    # A layer of PEFT's LoraLayer family, whose `scaling` multiplies each adapter's delta: peft_fast.helpers'
    # rescale_adapter_scale rescales it, as PEFT's helper does LoraLayer's (and no other layer type's).
    rescalable = False
    # Whether this layer can take the input embedding's factors as its own (ensure_weight_tying, tuners/tied.py).
    ties_to_embedding = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter: list[str] = []
        self._plans: dict = {}
        self._view: Optional[BaseView] = None
        # torch's load_state_dict writes into the parameters in place, without any of the layer's own events.
        self.register_load_state_dict_post_hook(invalidate_after_load)

    # --- the base --------------------------------------------------------------------------------------------------
    @classmethod
    def view_for(cls, module: nn.Module, key: Optional[str] = None) -> BaseView:
        """The view of `module` as a base of this tuner's layers, or an error naming target `key` when the tuner does
        not adapt such a module. The planner (injection.plan_adapter) and `base_view` ask here. Default: the shared
        views (Linear, transformers' Conv1D, 4-bit layers); a tuner adapting other modules (convolutions) returns
        its own views for them."""
        return linear_view(module, key)

    @classmethod
    def adapter_home(cls, module: nn.Module, target) -> Optional["TunerLayer"]:
        """The layer at a planned target (`module`, an injection.Target `target`) that takes a new adapter, or None
        when a new layer must wrap `module`. Default: the module itself when it is a layer of this class."""
        return module if isinstance(module, cls) else None

    @classmethod
    def wraps(cls, layer: "TunerLayer") -> bool:
        """Whether a new layer of this class may wrap an existing adapter layer (else: one module, one tuner)."""
        return False

    @property
    def base_view(self) -> BaseView:
        view = self._view
        if view is None or view.module is not self.base_layer:
            if view is not None:  # the base module was replaced: plans and values made for the old one go
                self._plans.clear()
                self._clear_caches()
            # PEFT's own layers adopted by peft_interop borrow this property without TunerLayer's classmethods.
            view_for = getattr(type(self), "view_for", linear_view)
            view = self._view = view_for(self.base_layer)
        return view

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def placed(self, tensor: torch.Tensor, autocast_adapter_dtype: bool = True) -> torch.Tensor:
        """A new adapter tensor where PEFT's layers put it: on the base's device in `base_view.init_dtype` (rounded
        there), then, with `autocast_adapter_dtype`, float16/bfloat16 upcast to float32."""
        view = self.base_view
        tensor = tensor.to(view.device) if view.init_dtype is None else tensor.to(view.device, view.init_dtype)
        if autocast_adapter_dtype and tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.to(torch.float32)
        return tensor

    def corrected_fan_in_fan_out(self, config) -> bool:
        """The base's real orientation. A config that says otherwise is corrected, with PEFT's warning, as PEFT's
        layers correct it (the stored config then says what the last adapted layer is)."""
        actual = self.base_view.fan_in_fan_out
        if config.fan_in_fan_out != actual:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out "
                          "to True." if actual else "fan_in_fan_out is set to True but the target module is "
                          "`torch.nn.Linear`. Setting fan_in_fan_out to False.")
            config.fan_in_fan_out = actual
        return actual

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # A convolution base's geometry, which models read back from the layers they built (Whisper's encoder:
    # conv1.stride[0]); PEFT's layers lack it, so adapting Whisper's convolutions fails there. Over other bases these
    # raise AttributeError, as on the base itself.
    in_channels = property(lambda self: self.base_layer.in_channels)
    out_channels = property(lambda self: self.base_layer.out_channels)
    kernel_size = property(lambda self: self.base_layer.kernel_size)
    stride = property(lambda self: self.base_layer.stride)
    padding = property(lambda self: self.base_layer.padding)
    dilation = property(lambda self: self.base_layer.dilation)
    groups = property(lambda self: self.base_layer.groups)
    padding_mode = property(lambda self: self.base_layer.padding_mode)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    # --- adapters ------------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> list[str]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    def has_adapter(self, name: str) -> bool:
        return name in getattr(self, self.adapter_layer_names[0])

    def available_adapters(self) -> list[str]:
        return sorted(getattr(self, self.adapter_layer_names[0]).keys())

    def adapter_parts(self, names: Optional[list[str]] = None) -> Iterator[tuple[str, Any]]:
        """(adapter name, module or parameter) of every trainable part, for the named adapters or all."""
        for dict_name in self.adapter_layer_names:
            for key, part in getattr(self, dict_name).items():
                if names is None or key in names:
                    yield key, part

    def adapter_parameters(self, names: Optional[list[str]] = None) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for _, part in self.adapter_parts(names):
            out += list(part.parameters()) if isinstance(part, nn.Module) else [part]
        return out

    def set_adapter(self, names: str | list[str], inference_mode: bool = False) -> None:
        names = [names] if isinstance(names, str) else list(names)
        for key, part in self.adapter_parts():
            _set_requires_grad(part, key in names and not inference_mode)
        self._active_adapter = names
        self.invalidate()

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for _, part in self.adapter_parts():
                _set_requires_grad(part, False)
            self._disable_adapters = True
        self.invalidate()

    def delete_adapter(self, name: str) -> None:
        for attr in self.adapter_layer_names + self.other_param_names + self.extra_adapter_dicts:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.invalidate()
        if name in self.active_adapters:
            remaining_active = [a for a in self.active_adapters if a != name]
            if remaining_active:
                self.set_adapter(remaining_active)
            else:
                self.set_adapter(self.available_adapters()[:1])

    # --- derived state and the events that drop it ---------------------------------------------------------------
    def invalidate(self, base: bool = False) -> None:
        """Drop the launch plans and the tuner's caches (and, with base=True, what was derived from the base)."""
        self._plans.clear()
        self._clear_caches()
        if base and self._view is not None:
            self._view.clear()
        if self._batch_key is not None:
            self._batch_key.stale = True

    def _clear_caches(self) -> None:
        """The tuner's own caches of derived values."""

    def train(self, mode: bool = True):
        # A change of mode drops everything derived (between training and inference the parameters moved on);
        # a call that keeps the mode (Trainer calls train() every step) keeps the plans, keyed on the mode anyway.
        if mode != self.training:
            self.invalidate(base=True)
        else:
            self.refresh()
        return super().train(mode)

    def refresh(self, base: bool = True) -> None:
        """Forget cached values (with base=False, keep those derived from the base). train() and eval() call it:
        how a user refreshes them after in-place edits through .data, which bump no version counter."""
        self._clear_caches()
        if base and self._view is not None:
            self._view.clear()
        if self._batch_key is not None:
            self._batch_key.stale = True

    def prepare_mixed(self, slot_names: tuple[str, ...]) -> None:
        """Get ready for mixed batches over these adapters (e.g. build stacked weights): called by the model's batch
        plan, eagerly, after an event changed the layer, so that the forward (compiled or not) finds them ready."""

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.invalidate(base=True)
        return result

    def __getstate__(self):
        # Plans are closures over this layer's modules: a copy (deepcopy, pickling) starts without them, and without
        # the mixed-batch stacks (a copy of every adapter, rebuilt by the copy's first mixed batch).
        state = self.__dict__.copy()
        state["_plans"], state["_view"] = {}, None
        if state.get("_stack_cache") is not None:
            state["_stack_cache"], state["_stack_dirty"] = None, True
        return state

    # --- forward -------------------------------------------------------------------------------------------------
    def plan_key(self, x: torch.Tensor) -> tuple:
        """What a launch plan depends on besides the events above: cheap to build on every call."""
        return (x.dtype, x.device, x.requires_grad, self.training, torch.is_grad_enabled(), settings.current(),
                has_hooks(self.base_layer))

    def plan(self, x: torch.Tensor):
        self.base_view  # noqa: B018  (a replaced base module drops the plans made for the old one)
        if keeps_no_state():  # traced or transformed code (torch.func) builds the plan inline and keeps nothing
            return self.make_plan(x)
        key = self.plan_key(x)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.make_plan(x)
        return plan

    def make_plan(self, x: torch.Tensor) -> Callable:
        """The tuner's decision of what forward runs for inputs like x: a callable(x, *args, **kwargs)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            adapter_names = batch_for(self)  # a mixed batch this layer's model runs in this thread, if any
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            check_adapter_names(x, adapter_names)
            if self.merged:
                raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                                 "`unmerge_adapter` first.")
            return self.mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        return self.plan(x)(x, *args, **kwargs)

    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        raise ValueError(f"{type(self).__name__} layers do not support mixed adapter batches (`adapter_names`).")

    # --- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        """File key (relative to the layer) -> shape of every tensor an adapter with `config` has at `target` (an
        injection.Target): files are checked against it before anything loads."""
        raise NotImplementedError(f"{cls.__name__} must say which tensors its adapter files hold (expected_state).")

    @classmethod
    def expected_shared_state(cls, model: nn.Module, plan) -> dict[str, Optional[tuple[int, ...]]]:
        """The `shared_adapter_dicts` entries an adapter planned by `plan` (injection.Plan) has in its files, by file
        key ("base_model.<dict>") -> shape; None for a key its files may hold that is not loaded (a dict whose
        buffers are not persistent, which torch's load_state_dict would skip too)."""
        return {}

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under PEFT's file keys relative to the layer ("lora_A.weight", ...)."""
        out = {}
        for dict_name in self.adapter_layer_names:
            container = getattr(self, dict_name)
            if name not in container:
                continue
            part = container[name]
            items = part.state_dict().items() if isinstance(part, nn.Module) else [("", part)]
            for k, v in items:
                key = f"{dict_name}.{k}" if k else dict_name
                out[self.file_key_renames.get(key, key)] = v
        return out

    def param_key(self, file_key: str, name: str) -> Optional[str]:
        """The parameter (relative to the layer) that a file key of this adapter loads into, or None."""
        for model_key, file_suffix in self.file_key_renames.items():
            if file_key == file_suffix:
                dict_name, _, rest = model_key.partition(".")
                return f"{dict_name}.{name}.{rest}" if rest else f"{dict_name}.{name}"
        dict_name, _, rest = file_key.partition(".")
        if dict_name in self.adapter_layer_names:
            return f"{dict_name}.{name}.{rest}" if rest else f"{dict_name}.{name}"
        return None

    # --- merging (bookkeeping in merging.py; the tuner writes the rule below) -------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        merging.merge_layers([self], safe_merge, adapter_names)

    def unmerge(self) -> None:
        merging.unmerge(self)

    def check_merge(self, names: list[str]) -> None:
        """Refuse a merge the rule cannot do (called before any layer changes)."""

    def merge_context(self, names: list[str], weight: torch.Tensor) -> Any:
        """Whatever the rule needs to merge `names` into `weight` (the base weight in its stored layout)."""
        return None

    def merge_weight(self, name: str, weight: torch.Tensor, ctx: Any, live: bool = False) -> torch.Tensor:
        """`weight` with adapter `name` merged in (in place when the base view's policy allows; `live`: weight is
        the base's own tensor). Stored layout ([in, out] for fan_in_fan_out bases)."""
        raise NotImplementedError

    def merge_bias(self, name: str, bias: Optional[torch.Tensor], live: bool = False) -> Optional[torch.Tensor]:
        return bias

    def merge_done(self, ctx: Any) -> None:
        """After a merge: keep what unmerging will need."""

    def unmerge_weight(self, name: str, weight: torch.Tensor, live: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def unmerge_bias(self, name: str, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return bias

    def unmerge_done(self, name: str) -> None:
        """After adapter `name` was taken out of the base again."""


def _count_as_peft_layers() -> None:
    """Libraries check `isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer)` to see an adapter layer: TRL
    refuses an adapter on lm_head (its losses read lm_head.weight directly, so that adapter would never train).
    With PEFT installed, peft_fast's layers count as such layers too, as the PeftModel counts as PEFT's."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    BaseTunerLayer.register(TunerLayer)


_count_as_peft_layers()
