"""TunerModel: the adapted model plus the bookkeeping of its adapters (PEFT's BaseTuner), shared by every tuner.

A tuner subclasses it with its `layer_cls` (a TunerLayer subclass), `default_targets` (PEFT's target_modules
defaults by model type) and, where it has per-layer values, `target_kwargs` (`prepare_config` for other
model-dependent defaults). Adding, deleting, activating, enabling, merging and unloading are all done here,
all-or-nothing; mixed-batch routing in mixed_routing.py.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional

import torch.nn as nn

from ..batching import RoutingKey, changes_adapters
from ..config import as_config
from ..names import check_adapter_name
from . import injection
from .base_layer import TunerLayer
from .mixed_routing import MixedBatchRouting
from .modules_to_save import ModulesToSaveWrapper
from .file_keys import load_adapter_tensors
from .token_targets import apply_tokens, plan_tokens
from .trainable_tokens import TrainableTokensWrapper, merge_plan, token_wrappers


class TunerModel(MixedBatchRouting, nn.Module):
    layer_cls: type = TunerLayer
    default_targets: dict[str, list[str] | str] = {}

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None, *,
                 autocast_adapter_dtype: bool = True, init: Optional[object] = None,
                 plan: Optional[injection.Plan] = None, tensors: Optional[dict] = None, source: str = "the adapter"):
        """PEFT's tuner constructor (its positional order). `low_cpu_mem_usage`: PEFT then makes the adapter on the
        meta device, to be loaded; here it is made with its values (loading overwrites them). `state_dict`: adapt
        the modules its keys name, as `inject_adapter_in_model(state_dict=...)`."""
        config = peft_config
        if state_dict is not None:
            from ..functional import targets_from  # (functional builds on the tuners)

            config = targets_from(state_dict, copy.deepcopy(as_config(config)), self.prefix)
        super().__init__()
        self.model = model
        self._batch_key = RoutingKey()  # what this model's mixed batches carry and its layers match (batching.py)
        self.peft_config: dict[str, Any] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.add_adapter(adapter_name, config, autocast_adapter_dtype, init=init, plan=plan, tensors=tensors,
                         source=source)

    def forward(self, *args: Any, **kwargs: Any):
        return self.model.forward(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    # --- what a tuner may refine -----------------------------------------------------------------------------------
    @classmethod
    def target_kwargs(cls, config: Any, key: str) -> dict:
        """Per-layer values handed to the layer (LoRA: r and lora_alpha from rank/alpha patterns)."""
        return {}

    @classmethod
    def tied_kwargs(cls, config: Any, key: str, source: dict) -> dict:
        """Per-layer values of a layer tied to the input embedding whose values are `source` (tied.py)."""
        return dict(source)

    @classmethod
    def layer_for(cls, module: nn.Module, key: str) -> tuple[type, Any]:
        """(layer class, base view) for a targeted base module, or an error naming `key` when no layer of this tuner
        adapts it. Default: the tuner's one `layer_cls`, which says through its `view_for` what it adapts."""
        return cls.layer_cls, cls.layer_cls.view_for(module, key)

    @classmethod
    def plan_parameters(cls, model: nn.Module, config: Any, module_targets: list[str]) -> list:
        """Targets (injection.Target) for parameters rather than modules (LoRA's target_parameters)."""
        return []

    @classmethod
    def prepare_config(cls, config: Any, model: nn.Module) -> None:
        """Fill in, on the plan's copy of the config, the values PEFT derives from the model before injecting (IA3's
        feedforward_modules by model type); `after_injection` can copy them to the stored config."""

    @classmethod
    def with_init(cls, config: Any, init: object) -> Any:
        """The config with its initialisation replaced (loads pass False: the weights come from the file)."""
        return config

    @classmethod
    def check_init(cls, config: Any) -> None:
        """Refuse an initialisation this tuner cannot run, when an adapter is created (not loaded)."""

    @classmethod
    def rewrites_base(cls, config: Any) -> bool:
        """Whether creating the adapter rewrites the base weights (then a failure must put them back)."""
        return False

    def check_new_adapter(self, config: Any) -> None:
        """Refuse an adapter that cannot live beside the existing ones (before anything changes)."""

    # --- adding and removing -----------------------------------------------------------------------------------
    @changes_adapters
    def add_adapter(self, adapter_name: str, config: Any, autocast_adapter_dtype: bool = True,
                    init: Optional[object] = None, plan: Optional[injection.Plan] = None,
                    tensors: Optional[dict] = None, source: str = "the adapter") -> None:
        """Plan, check, then inject (and load `tensors`); any failure undoes every change (model, configs, grads).
        It waits for the mixed batches other threads are serving and holds new ones until done (batching.SERVING)."""
        check_adapter_name(adapter_name)
        config = as_config(config)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name} already exists; delete it first or pick a new name.")
        known = {getattr(c, "peft_type", None) for c in self.peft_config.values()}
        if known and config.peft_type not in known:
            raise ValueError(f"This model holds {', '.join(sorted(known))} adapters; a {config.peft_type} adapter "
                             "cannot be added beside them.")
        converted = _converted(self.model, config, adapter_name) if plan is None else config
        self.check_new_adapter(converted)  # as PEFT: the converted targets are the ones checked against the others'
        with self.preparing(self.model, converted) if plan is None else nullcontext():  # (a plan: made after it)
            self._add_planned(adapter_name, config, converted, plan, autocast_adapter_dtype, init, tensors, source)

    @classmethod
    def file_tensors(cls, model: nn.Module, config: Any, tensors: dict) -> dict:
        """A file's tensors as they load into `model` once prepared (prepare_model): LoRA drops the keys of replicated
        layers the model does not have, as PEFT does."""
        return tensors

    @classmethod
    def prepare_model(cls, model: nn.Module, config: Any) -> Optional[Callable[[], None]]:
        """Change the model's structure before an adapter's targets are planned (PEFT's _prepare_model: LoRA's
        layer_replication); returns the undo, or None when nothing changed."""
        return None

    @classmethod
    @contextmanager
    def preparing(cls, model: nn.Module, config: Any) -> Iterator[None]:
        """prepare_model, undone if the block raises (the adapter did not go in). Loading plans the file's adapter
        inside it, add_adapter when it plans itself."""
        restore = cls.prepare_model(model, config)
        try:
            yield
        except BaseException:
            if restore is not None:
                restore()
            raise

    def _add_planned(self, adapter_name: str, config: Any, converted: Any, plan: Optional[injection.Plan],
                     autocast_adapter_dtype: bool, init: Optional[object], tensors: Optional[dict],
                     source: str) -> None:
        plan = plan or injection.plan_adapter(self.model, converted, type(self))
        if converted is not config:  # recorded as PEFT records them (adapter_config.json: a reload finds them)
            for f in CONVERTED_FIELDS:
                setattr(config, f, getattr(converted, f))
        config.target_modules = plan.config.target_modules
        config.modules_to_save = plan.config.modules_to_save
        tokens = plan_tokens(self.model, plan)  # trainable_token_indices: its checks, before any change
        undo = injection.Undo(self.model)
        # As PEFT: the first adapter freezes the base; later ones never change existing parameters' trainability.
        first = next(injection.tuner_layers(self.model), None) is None
        existing = [] if first else [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            self.peft_config[adapter_name] = config
            undo.push(lambda: self.peft_config.pop(adapter_name, None))
            seen = injection.apply_plan(self.model, plan, adapter_name, undo, type(self), autocast_adapter_dtype,
                                        init)
            apply_tokens(self.model, tokens, adapter_name, undo, autocast_adapter_dtype)
            self.claim_layers()
            self.after_injection(config, seen)
            if tensors is not None:
                load_adapter_tensors(self.model, tensors, adapter_name, source)
            if not [a for a in self.active_adapters if a in self.peft_config]:
                before = self.active_adapter
                undo.push(lambda: setattr(self, "active_adapter", before))
                self.active_adapter = adapter_name  # nothing was active (the last one was deleted): this one is
            self.set_adapter(self.active_adapters, _check=False)
            if config.inference_mode:
                injection.set_adapter_requires_grad(self.model, [adapter_name], False)
            # After the freeze, as in PEFT: bias="all" keeps every bias trainable, loaded adapters' included.
            injection.mark_only_adapters_trainable(self.model, self.peft_config, self.active_adapters)
            for p, flag in existing:
                p.requires_grad_(flag)
        except BaseException:
            undo.rollback()
            raise
        order = self.__dict__.setdefault("_targeted_order", {})
        for t in plan.targets:
            parameter = t.kwargs.get("parameter_name")
            order.setdefault(t.key if parameter is None else f"{_module_path(t.key)}.{parameter}", len(order))

    def after_injection(self, config: Any, seen: Any) -> None:
        """The config the layers saw (`apply_plan`'s result), e.g. to record corrections the layers made."""

    @changes_adapters
    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        layers = [m for _, m in self.adapter_layers()] + [m for _, m in token_wrappers(self.model)]
        merged = sorted({a for m in layers for a in m.merged_adapters if a == adapter_name})
        if merged:
            raise ValueError(f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first.")
        del self.peft_config[adapter_name]
        # PEFT's rule: each layer falls back to its own remaining adapters; the model follows the first layer.
        new_active: Optional[list[str]] = None
        for _, m in list(self.adapter_layers()):
            m.delete_adapter(adapter_name)
            if new_active is None:
                new_active = m.active_adapters[:]
        if adapter_name in self.active_adapters and new_active:
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{new_active[0] if len(new_active) == 1 else new_active}.")
        elif adapter_name in self.active_adapters:
            warnings.warn(f"Adapter {adapter_name} was the last active adapter: none is active now, and outputs are "
                          "the base model's until an adapter is added or set_adapter(...) is called.")
        for _, m in list(injection.tuner_layers(self.model)):
            if isinstance(m, ModulesToSaveWrapper):
                m.delete_adapter(adapter_name, new_active)
        new_active = new_active or []
        self.active_adapter = new_active[0] if len(new_active) == 1 else new_active

    # --- activation --------------------------------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, TunerLayer]]:
        return injection.adapter_layers(self.model)

    @property
    def targeted_module_names(self) -> list[str]:
        """PEFT's attribute: the modules that carry an adapter layer (parameters: `targeted_parameter_names`), in
        PEFT's order: as the adapters first targeted them (each adapter's in module order)."""
        live = [k for k, m in self.adapter_layers() if getattr(m, "parameter_name", None) is None]
        first = self.__dict__.get("_targeted_order", {})
        return sorted(live, key=lambda k: first.get(k, len(first)))  # (stable: others keep module order, last)

    @property
    def targeted_parameter_names(self) -> list[str]:
        """PEFT's attribute: `<module>.<parameter>` of every parameter an adapter targets (target_parameters)."""
        names = []
        for k, m in self.adapter_layers():
            if getattr(m, "parameter_name", None) is not None:
                name = f"{_module_path(k)}.{m.parameter_name}"
                if name not in names:
                    names.append(name)
        first = self.__dict__.get("_targeted_order", {})  # PEFT's order, as for targeted_module_names
        return sorted(names, key=lambda n: first.get(n, len(first)))

    @changes_adapters
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False, _check: bool = True) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if _check:  # every check before any change: a refused call leaves the model as it was
            if not names:
                raise ValueError("set_adapter needs at least one adapter name; to run the base model alone, use "
                                 "`with model.disable_adapter():`.")
            self._check_known(names)
            for _, m in injection.tuner_layers(self.model):
                if isinstance(m, ModulesToSaveWrapper) and sum(n in m.modules_to_save for n in names) > 1:
                    if isinstance(m, TrainableTokensWrapper):
                        raise ValueError(f"Only one adapter can be set at a time for trainable tokens, got {names}.")
                    raise ValueError(f"Attempted to set multiple ({names}) adapters at once for modules_to_save.")
        for _, m in injection.tuner_layers(self.model):
            if isinstance(m, (TunerLayer, TrainableTokensWrapper)) and m.merged and _check:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                m.unmerge()
            if isinstance(m, ModulesToSaveWrapper):
                m.set_adapter([n for n in names if n in m.modules_to_save], inference_mode)
            else:
                m.set_adapter(names, inference_mode)
        self.active_adapter = names[0] if len(names) == 1 else names

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        injection.set_adapter_requires_grad(self.model, names, requires_grad)

    def enable_adapter_layers(self) -> None:
        for _, m in injection.tuner_layers(self.model):
            m.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for name in self.active_adapters:
            bias = getattr(self.peft_config[name], "bias", "none")
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.")
        for _, m in injection.tuner_layers(self.model):
            m.enable_adapters(False)

    @changes_adapters
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(state_dict, strict, assign)

    # --- merging -----------------------------------------------------------------------------------------------
    @changes_adapters
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_known(adapter_names)
        write_tokens = merge_plan(self.model, adapter_names, safe_merge)  # checked before any layer changes
        injection.merge_layers([m for _, m in self.adapter_layers()], safe_merge, adapter_names)
        write_tokens()

    @changes_adapters
    def unmerge_adapter(self) -> None:
        layers = [m for _, m in list(self.adapter_layers()) + token_wrappers(self.model) if m.merged]
        if not layers:
            warnings.warn("Already unmerged. Nothing to do.")  # PEFT's warning (per layer there)
        for m in layers:
            m.unmerge()

    def _check_known(self, adapter_names: Optional[list[str]]) -> None:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, got the string {adapter_names!r}; "
                            f"pass [{adapter_names!r}].")
        for n in adapter_names or []:
            if n not in self.peft_config:
                raise ValueError(f"Adapter {n} not found. Available adapters: {sorted(self.peft_config)}")

    @changes_adapters
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None, dequantize: bool = False) -> nn.Module:
        """``dequantize=True`` (not in PEFT): merge into 4-bit bases without re-quantizing, returning plain
        nn.Linear layers with the exact merged weights; by default they are re-quantized, as PEFT does."""
        self._check_known(adapter_names)
        write_tokens = merge_plan(self.model, adapter_names, safe_merge)  # into layers the unload keeps
        model = injection.unload(self.model, merge=True, safe_merge=safe_merge, adapter_names=adapter_names,
                                 dequantize=dequantize, progressbar=progressbar)
        write_tokens()
        return model

    @changes_adapters
    def unload(self) -> nn.Module:
        return injection.unload(self.model, merge=False)


def _module_path(key: str) -> str:
    """A parameter wrapper's module path: several parameters of one module are nested wrappers."""
    while key.endswith(".base_layer"):
        key = key.removesuffix(".base_layer")
    return key


CONVERTED_FIELDS = ("target_parameters", "rank_pattern", "alpha_pattern")


def _converted(model: nn.Module, config: Any, adapter_name: str) -> Any:
    """As PEFT's injection, for a new adapter too: on a transformers-5 model whose layout changed (mixture-of-experts
    layers' stacked experts), MLP names in target_modules become the experts' target_parameters (the fused gate/up
    pair with doubled rank and alpha). Without PEFT installed this cannot run, and the names reach Linear modules
    only. A file's config was converted when it was read."""
    from ..loading import convert_v4_layout

    return convert_v4_layout(model, config, {}, adapter_name)[0]
