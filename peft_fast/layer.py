"""LoraLinear: the thin module that replaces a target linear layer. It owns parameters; kernels do the math."""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from . import dora, lora_init, merging, quantized
from .config import LoraConfig
from .kernels import lora_linear, multi_lora, qlora_linear, use_triton
from .mixed_batch import AdapterNames, AdapterStacks, StackCache, stack_dtype


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # transformers is a dependency, but keep plain-torch use working
        return ()


def check_adapter_names(x: torch.Tensor, adapter_names: list[str]) -> None:
    if len(x) != len(adapter_names):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(adapter_names)} and {len(x)} respectively.")


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class LoraLinear(nn.Module):
    """PEFT's ``lora.Linear``: same attribute names, same parameter names, same semantics."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int, lora_alpha: float,
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_layer = base_layer
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
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter: list[str] = [adapter_name]
        self.fan_in_fan_out = self._check_fan_in_fan_out(config)
        if hasattr(base_layer, "in_features"):  # nn.Linear, and 4-bit layers (bnb, NF4Linear) whose weight is packed
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.out_features, self.in_features = base_layer.weight.shape
        self.update_layer(adapter_name, r, lora_alpha, config, autocast_adapter_dtype)

    def _check_fan_in_fan_out(self, config: LoraConfig) -> bool:
        conv1d = _conv1d_type()
        if conv1d and isinstance(self.base_layer, conv1d):
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
    def update_layer(self, name: str, r: int, lora_alpha: float, config: LoraConfig,
                     autocast_adapter_dtype: bool = True) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if config.use_dora:
            if config.lora_bias:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
            dora.check_base(self)
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
        self.use_dora[name] = bool(config.use_dora)
        self.scaling[name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        lora_init.initialise(self, name, config.init_lora_weights)
        self._move_adapter_to_base(name, autocast_adapter_dtype)
        if config.use_dora:  # as PEFT: from the initialised adapter, on the base's device
            dora.init_magnitude(self, name)
        elif name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_base(self, name: str, autocast_adapter_dtype: bool) -> None:
        # PEFT moves the adapter to the base layer's device and dtype, then upcasts half precision to float32.
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for mod in (self.lora_A, self.lora_B):
            mod[name] = mod[name].to(weight.device, dtype=dtype)
            if autocast_adapter_dtype and mod[name].weight.dtype in (torch.float16, torch.bfloat16):
                mod[name] = mod[name].to(torch.float32)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

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

    def available_adapters(self) -> list[str]:
        return sorted(self.lora_A.keys())

    def set_adapter(self, names: str | list[str], inference_mode: bool = False) -> None:
        names = [names] if isinstance(names, str) else list(names)
        for dict_name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            for key, mod in getattr(self, dict_name).items():
                _set_requires_grad(mod, key in names and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for dict_name in ("lora_A", "lora_B", "lora_magnitude_vector"):
                for mod in getattr(self, dict_name).values():
                    _set_requires_grad(mod, False)
            self._disable_adapters = True

    def delete_adapter(self, name: str) -> None:
        for attr in ("lora_A", "lora_B", "lora_dropout", "r", "lora_alpha", "scaling", "use_rslora", "use_dora",
                     "lora_bias", "lora_magnitude_vector"):
            container = getattr(self, attr)
            if name in container:
                del container[name]
        dora.clear(self, name)
        if name in self.active_adapters:
            remaining_active = [a for a in self.active_adapters if a != name]
            if remaining_active:
                self.set_adapter(remaining_active)
            else:
                left = self.available_adapters()
                self.set_adapter(left[:1])

    # --- math --------------------------------------------------------------------------------------------------
    def _plain_base(self) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(weight [out, in], bias) when the base is a plain Linear/Conv1D we can fuse with; else None."""
        base = self.base_layer
        if base._forward_hooks or base._forward_pre_hooks or type(base) not in (nn.Linear, _conv1d_type()):
            return None
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        return weight, base.bias

    def _adapter_args(self, name: str) -> tuple:
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        b = self.lora_B[name]
        scaling = self.scaling[name]
        if isinstance(scaling, torch.Tensor):
            # A tensor scaling (prepared for compiled hotswap) may change value without a recompile: fold it into B,
            # a tiny [out, r] product, so the op sees a constant 1.0.
            return (self.lora_A[name].weight, b.weight * scaling, 1.0, p,
                    b.bias * scaling if b.bias is not None else None)
        return self.lora_A[name].weight, b.weight, scaling, p, b.bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            check_adapter_names(x, adapter_names)
            if self.merged:
                raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                                 "`unmerge_adapter` first.")
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        any_dora = any(self.use_dora.get(a) for a in active)
        if any_dora and not (args or kwargs or len(active) > 1):
            y = dora.fused_forward(self, active[0], x)
            if y is not None:
                return y
        elif not (args or kwargs or len(active) > 1):
            plain = self._plain_base()
            if plain is not None:
                a, b, s, p, b_bias = self._adapter_args(active[0])
                return lora_linear(x, plain[0], plain[1], a, b, s, p, b_bias)
            q = quantized.fused_base(self, x)  # a 4-bit base: (packed, state, bias, cast), or None
            if q is not None:
                a, b, s, p, b_bias = self._adapter_args(active[0])
                if q[3] is not None:  # float32 activations into a 16-bit compute dtype: run in it, cast back
                    return qlora_linear(x.to(q[3]), q[0], q[1], q[2], a, b, s, p, b_bias).to(x.dtype)
                return qlora_linear(x, q[0], q[1], q[2], a, b, s, p, b_bias)
        result = self.base_layer(x, *args, **kwargs)
        if any_dora:
            return dora.loop_forward(self, x, result, active)
        if quantized.is_4bit_base(self.base_layer):  # PEFT's 4-bit layer casts each delta, then adds it
            return quantized.add_deltas(self, x, result, active)
        out_dtype = result.dtype
        for name in active:
            a, b, s, p, b_bias = self._adapter_args(name)
            result = result + lora_linear(x, None, None, a, b, s, p, b_bias)
        return result.to(out_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
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
        out_dtype, q4 = result.dtype, quantized.is_4bit_base(self.base_layer)
        for name in set(adapter_names):
            if name == "__base__" or name not in self.lora_A:
                continue
            rows = [i for i, item in enumerate(adapter_names) if item == name]
            if self.use_dora.get(name):
                result[rows] = dora.mixed_rows(self, name, x, result, rows)
                continue
            a, b, s, p, b_bias = self._adapter_args(name)
            x = x.to(a.dtype) if q4 else x  # PEFT's 4-bit layer keeps x cast to the last adapter's dtype
            result[rows] += lora_linear(x[rows], None, None, a, b, s, p, b_bias).to(out_dtype)
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
        cache = self.__dict__.get("_stack_cache")
        if cache is None or not cache.fresh(self, slot_names, dtype):
            cache = StackCache(self, slot_names, dtype)
            self.__dict__["_stack_cache"] = cache
        return cache.stacks

    def train(self, mode: bool = True):
        if self.lora_magnitude_vector:
            # No cached scale or ||W||² survives a call to train()/eval(): it is also how a user refreshes them
            # after in-place edits through .data, which bump no version counter.
            dora.clear(self, base=True)
        return super().train(mode)

    # --- merging -----------------------------------------------------------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        # CPU matmuls in half precision are slow and lossy: PEFT computes them in float32 and casts back.
        cast = a.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
        delta = (b.float() @ a.float()) if cast else b @ a
        delta = (delta.T if self.fan_in_fan_out else delta) * self.scaling[name]
        return delta.to(b.dtype) if cast else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        merging.merge(self, safe_merge, adapter_names)

    def unmerge(self) -> None:
        merging.unmerge(self)

    def __repr__(self) -> str:
        # PEFT's name for this layer type, which get_layer_status reports and users grep for.
        return "lora.Linear" + super().__repr__()[len(type(self).__name__):]
