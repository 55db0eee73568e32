"""LoraLinear: the thin module that replaces a target linear layer. It owns parameters; kernels do the math.

Same attribute and parameter names as PEFT's `lora.Linear`. Each adapter has a variant (variants.py: plain LoRA,
dora.py: DoRA), chosen when the adapter is created. Forward runs the layer's launch plan: decided once per plan key
(base_layer.py) and dropped by the events that change it, it is either the base module alone, one fused op for a
single adapter over a fusable base (`variant.fused`), or the base module followed by each adapter's step in PEFT's
order (`loop`).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from ...batching import AdapterNames
from ...kernels import multi_lora, use_triton
from ..base_layer import TunerLayer
from . import init as lora_init
from .dora import DoraVariant
from .stacks import AdapterStacks, StackCache, stack_dtype
from .variants import LORA, op_args


def variant_for(config):
    """The variant an adapter with this config gets: where `use_dora` is read, and nowhere else."""
    return DoraVariant() if config.use_dora else LORA


class _MergeContext:
    __slots__ = ("w0", "norms")

    def __init__(self, w0: Optional[torch.Tensor]):
        self.w0 = w0  # the base with every merged adapter taken out (only when a DoRA adapter is merged)
        self.norms: dict[str, torch.Tensor] = {}  # DoRA: the norm each adapter's merge used


class _LoraPlan:
    """What forward runs: the fused op of a single adapter when there is one (and no extra forward arguments),
    else the base module followed by PEFT's adapter loop."""

    __slots__ = ("layer", "active", "fused")

    def __init__(self, layer: "LoraLinear", active: list[str], fused):
        self.layer, self.active, self.fused = layer, active, fused

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.fused is not None and not (args or kwargs):
            return self.fused(x)
        return self.layer.loop(x, self.layer.base_layer(x, *args, **kwargs), self.active)


class LoraLinear(TunerLayer):
    """PEFT's ``lora.Linear``: same attribute names, same parameter names, same semantics."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")
    extra_adapter_dicts = ("use_rslora", "use_dora", "lora_bias", "lora_magnitude_vector", "lora_variant")
    file_key_renames = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}  # PEFT's DoRA key

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, lora_alpha: float,
                 autocast_adapter_dtype: bool = True):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        # PEFT keeps these (empty for linear layers); kept so module trees and names line up one to one.
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_variant: dict[str, Any] = {}
        self._stack_cache: Optional[StackCache] = None
        self._active_adapter = [adapter_name]
        self.fan_in_fan_out = self._check_fan_in_fan_out(config)
        self.in_features, self.out_features = self.base_view.in_features, self.base_view.out_features
        self.update_layer(adapter_name, config, r, lora_alpha, autocast_adapter_dtype)

    def _check_fan_in_fan_out(self, config) -> bool:
        if self.base_view.fan_in_fan_out:
            if not config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                              "Setting fan_in_fan_out to True.")
                config.fan_in_fan_out = True
            return True
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.")
            config.fan_in_fan_out = False
        return False

    # --- adapters ------------------------------------------------------------------------------------------------
    def update_layer(self, name: str, config, r: int, lora_alpha: float, autocast_adapter_dtype: bool = True) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        variant = variant_for(config)
        variant.check(self, config)
        if config.lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {type(self.base_layer).__name__} "
                          "has no bias. This means that merging LoRA weights won't be possible.")
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.lora_dropout[name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        # A new module starts in training mode; follow the layer, so an adapter added to a model in eval mode does
        # not drop out (PEFT 0.21 leaves it training until the next .eval()).
        self.lora_dropout[name].train(self.training)
        # Same module types, created in the same order as PEFT: under one seed both draw identical weights.
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias)
        self.lora_bias[name] = config.lora_bias
        self.use_rslora[name] = config.use_rslora
        self.use_dora[name] = variant.name == "dora"  # PEFT's attribute, for introspection
        self.lora_variant[name] = variant
        self.scaling[name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        lora_init.initialise(self, name, config.init_lora_weights)
        self._move_adapter_to_base(name, autocast_adapter_dtype)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        variant.init(self, name)  # DoRA: the magnitude, from the initialised adapter, on the base's device
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_base(self, name: str, autocast_adapter_dtype: bool) -> None:
        # PEFT moves the adapter to the base layer's device and dtype, then upcasts half precision to float32.
        view = self.base_view
        for mod in (self.lora_A, self.lora_B):
            mod[name] = mod[name].to(view.device, dtype=view.adapter_dtype)
            if autocast_adapter_dtype and mod[name].weight.dtype in (torch.float16, torch.bfloat16):
                mod[name] = mod[name].to(torch.float32)

    def adapter_args(self, name: str) -> tuple:
        """(A, B, scaling, dropout p, B's bias) of adapter `name` as the ops take them (variants.op_args)."""
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        b_params = self.lora_B._modules[name]._parameters
        return op_args(self.lora_A._modules[name]._parameters["weight"], b_params["weight"], b_params.get("bias"),
                       self.scaling[name], p)

    def _clear_caches(self) -> None:
        self._stack_cache = None
        for variant in self.lora_variant.values():
            variant.clear()

    def refresh(self) -> None:
        if len(self.lora_magnitude_vector):  # only DoRA's values can go stale without a version bump's notice
            super().refresh()

    # --- forward -------------------------------------------------------------------------------------------------
    def make_plan(self, x: torch.Tensor):
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active:
            return self.base_layer
        fused = self.lora_variant[active[0]].fused(self, active[0], x) if len(active) == 1 else None
        return _LoraPlan(self, active, fused)

    def loop(self, x: torch.Tensor, result: torch.Tensor, active: list[str]) -> torch.Tensor:
        """PEFT's adapter loop after the base output `result`: its dense `lora.Linear` order (the sum cast once) or
        its bnb `Linear4bit` order (each delta cast to the output dtype, x kept cast to the adapter dtype)."""
        q4 = self.base_view.quantized
        cast = q4 or any(self.lora_variant[n].scales_channels for n in active)
        out_dtype = result.dtype
        for name in active:
            if cast:
                x = x.to(self.lora_A[name].weight.dtype)
            result = self.lora_variant[name].add(self, name, x, result, q4, out_dtype)
            if q4:
                result = result.to(out_dtype)
        return result.to(out_dtype)

    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        result = self.base_layer(x, *args, **kwargs)
        if not any(n in self.lora_A for n in set(adapter_names)):
            return result
        if isinstance(adapter_names, AdapterNames) and not self._needs_grad(x):
            # One shrink and one expand for the whole batch, whatever the number of adapters in it.
            stacks = self._stacks(adapter_names.slot_names, x)
            x2d, y2d = x.reshape(-1, self.in_features), result.reshape(-1, self.out_features)
            multi_lora(x2d, y2d, stacks.a, stacks.b, stacks.ranks, stacks.scalings, adapter_names.meta_for(x),
                       stacks.bias, inplace=True,  # the base output is ours and needs no autograd
                       dora_scale=stacks.dora_scale,
                       base_bias=self.bias.detach() if stacks.dora_scale is not None and self.bias is not None
                       else None)
            return result
        # Gradients wanted (or a caller passed a plain list): PEFT's per-adapter loop, differentiable.
        q4 = self.base_view.quantized
        for name in set(adapter_names):
            if name == "__base__" or name not in self.lora_A:
                continue
            rows = [i for i, item in enumerate(adapter_names) if item == name]
            x = self.lora_variant[name].mixed_rows(self, name, x, result, rows, q4)
        return result

    def _needs_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector)
                                      for p in d.parameters())

    def _stacks(self, slot_names: tuple[str, ...], x: torch.Tensor) -> AdapterStacks:
        """Stacked adapter weights for the batched kernels, rebuilt only when an adapter changed."""
        adapter_dtype = next(iter(self.lora_A.values())).weight.dtype
        dtype = stack_dtype(x, adapter_dtype, use_triton(x))
        cache = self._stack_cache
        if cache is None or not cache.fresh(self, slot_names, dtype):
            cache = self._stack_cache = StackCache(self, slot_names, dtype)
        return cache.stacks

    # --- merging: LoRA's rule (the bookkeeping is tuners/merging.py) ----------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        # CPU matmuls in half precision are slow and lossy: PEFT computes them in float32 and casts back.
        cast = a.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
        delta = (b.float() @ a.float()) if cast else b @ a
        delta = (delta.T if self.fan_in_fan_out else delta) * self.scaling[name]
        return delta.to(b.dtype) if cast else delta

    def check_merge(self, names: list[str]) -> None:
        if any(self.lora_bias[n] for n in names) and getattr(self.base_layer, "bias", None) is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")

    def merge_context(self, names: list[str], weight: torch.Tensor) -> _MergeContext:
        if not any(self.lora_variant[n].scales_channels for n in names):
            return _MergeContext(None)
        return _MergeContext(self._unmerged_base(weight.detach().clone()))

    def _unmerged_base(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (a copy of the base weight) with the layer's merged adapters taken out, newest first."""
        for name in reversed(self.merged_adapters):
            if name not in self.lora_A:
                continue
            variant = self.lora_variant[name]
            if variant.scales_channels:
                weight = variant.unmerge(self, name, weight, False)
            else:
                weight = weight - self.get_delta_weight(name).to(weight.dtype)
        return weight

    def merge_weight(self, name: str, weight: torch.Tensor, ctx: _MergeContext, live: bool = False) -> torch.Tensor:
        return self.lora_variant[name].merge(self, name, weight, ctx, live)

    def merge_bias(self, name: str, bias: Optional[torch.Tensor], live: bool = False) -> Optional[torch.Tensor]:
        if self.lora_bias[name]:
            delta = self.lora_B[name].bias.data * self.scaling[name]
            bias += delta if live else delta.to(bias.dtype)
        return bias

    def merge_done(self, ctx: _MergeContext) -> None:
        for name in ctx.norms:
            self.lora_variant[name].merge_done(self, name, ctx)

    def unmerge_weight(self, name: str, weight: torch.Tensor, live: bool = False) -> torch.Tensor:
        return self.lora_variant[name].unmerge(self, name, weight, live)

    def unmerge_bias(self, name: str, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.lora_bias[name]:
            bias -= (self.lora_B[name].bias.data * self.scaling[name]).to(bias.dtype)
        return bias

    def unmerge_done(self, name: str) -> None:
        self.lora_variant[name].unmerge_done()

    # --- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        r, out_f, in_f = target.kwargs["r"], target.out_features, target.in_features
        shapes = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}
        if config.lora_bias:
            shapes["lora_B.bias"] = (out_f,)
        return {**shapes, **variant_for(config).file_tensors(out_f)}

    def __repr__(self) -> str:
        # PEFT's name for this layer type, which get_layer_status reports and users grep for.
        return "lora.Linear" + super().__repr__()[len(type(self).__name__):]
