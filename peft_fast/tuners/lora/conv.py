"""LoraConv1d / LoraConv2d / LoraConv3d: PEFT's ``lora.Conv1d`` / ``lora.Conv2d`` / ``lora.Conv3d`` (its _ConvNd).

Per adapter, `lora_A.<name>` is a convolution from in_channels to r with the base's kernel size, stride and padding,
and `lora_B.<name>` a 1x1 convolution from r to out_channels with the base's groups (PEFT's modules, parameter
names and file keys): y = base(x) + s·B(A(drop(x))). Forward folds s into B's [out, r] weight (and bias) rather than
scaling the [N, out, ...] output, and adds B's 1x1 convolution to the base output in one batched matmul; merging
adds s·B·A, reshaped to the base's kernel, to the base weight.

A deliberate difference: PEFT 0.21 builds lora_A without the base's dilation and padding_mode, so that on a
dilated base its forward fails (the two outputs differ in size) or, where the sizes happen to agree, computes
something its merge does not; with another padding_mode its forward pads A's input with zeros while the merged
layer does not. Here A takes both from the base (as PEFT's open fix, huggingface/peft#3758): forward is the merged
layer, and the weights and files are PEFT's (neither setting changes a shape).

As in PEFT: grouped bases (groups > 1) need a rank divisible by groups and cannot be merged; pissa / olora
initialisations are refused (PEFT's "Unknown initialization"). DoRA: dora_layers.py (groups=1 only).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from ...bases import BaseView, ConvView
from ...names import BASE_NAME
from ..injection import base_of
from . import init as lora_init
from .dora_layers import DoraConvVariant
from .layer import LoraLinear
from .variants import LORA


class _ConvPlan:
    """The base convolution, then each active adapter's contribution in PEFT's order."""

    __slots__ = ("layer", "active")

    def __init__(self, layer, active: list[str]):
        self.layer, self.active = layer, active

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        result = layer.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active:
            x = x.to(layer.lora_A[name].weight.dtype)  # PEFT casts the input to each adapter's dtype in turn
            variant = layer.lora_variant[name]
            if variant is LORA:
                result = layer.add_lora(name, layer.lora_dropout[name](x), result)
            else:
                result = variant.add_conv(layer, name, x, result)
        return result.to(out_dtype)


class LoraConv(LoraLinear):
    """PEFT's ``lora._ConvNd``: same attribute names, same parameter names, same semantics."""

    conv_type: type = nn.Conv2d  # the torch class of the bases (and of lora_A / lora_B)
    kind = "Conv2d"  # PEFT's layer name after "lora."

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, lora_alpha: float,
                 autocast_adapter_dtype: bool = True):
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        super().__init__(base_layer, adapter_name, config, r, lora_alpha, autocast_adapter_dtype)

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.conv_type)

    @classmethod
    def view_for(cls, module: nn.Module, key: Optional[str] = None) -> BaseView:
        if not cls.adapts(module):
            raise ValueError(f"Target module {key} ({type(module).__name__}) is not a torch.nn.{cls.kind}.")
        return ConvView(module)

    @classmethod
    def variant_for(cls, config):
        return DoraConvVariant() if config.use_dora else LORA

    def _check_fan_in_fan_out(self, config) -> bool:
        return False  # a convolution has no orientation to correct (PEFT leaves the config alone)

    def _check_config(self, config, r: int) -> None:
        super()._check_config(config, r)
        groups = self.base_layer.groups
        if r % groups != 0:
            raise ValueError(f"Targeting a {type(self.base_layer).__name__} with groups={groups} and rank {r}. "
                             "Currently, support is limited to conv layers where the rank is divisible by groups. "
                             "Either choose a different rank or do not target this specific layer.")

    def _new_factors(self, name: str, r: int, bias: bool) -> None:
        base = self.base_layer
        ones = (1,) * (base.weight.dim() - 2)
        # PEFT's modules in PEFT's order (the same draws under one seed), plus the base's dilation and padding_mode.
        self.lora_A[name] = self.conv_type(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                           base.dilation, bias=False, padding_mode=base.padding_mode)
        self.lora_B[name] = self.conv_type(r, self.out_features, ones, ones, groups=base.groups, bias=bias)

    def _initialise(self, name: str, init) -> None:
        lora_init.reset(self, name, init)  # PEFT's convolutions know True, False and "gaussian" only

    def prepare_mixed(self, slot_names: tuple[str, ...]) -> None:
        """Mixed batches run PEFT's per-adapter loop here: nothing to stack."""

    # --- forward -------------------------------------------------------------------------------------------------
    def lora_out(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s·B(A(x)), with s folded into B's [out, r] weight and its bias."""
        a, b = self.lora_A[name], self.lora_B[name]
        s = self.scaling[name]
        if self.calls_modules([name]):  # PEFT's order, B called as a module
            return b(a(x)) * s
        bias = b.bias * s if b.bias is not None else None
        return b._conv_forward(a(x), b.weight * s, bias)

    def add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + s·B(A(x)). B is a 1x1 convolution: over a batched, contiguous [N, out, ...] result of the same
        dtype (groups=1), one baddbmm adds it without an [N, out, ...] temporary."""
        h = self.lora_A[name](x)
        b = self.lora_B[name]
        s = self.scaling[name]
        if self.calls_modules([name]):  # PEFT's order, B called as a module
            return result + b(h) * s
        w = b.weight * s
        if (self.base_layer.groups != 1 or result.dtype != h.dtype or result.dim() != w.dim()
                or result.shape[2:] != h.shape[2:] or not (result.is_contiguous() and h.is_contiguous())):
            return result + b._conv_forward(h, w, b.bias * s if b.bias is not None else None)
        n, out_c, r = result.shape[0], result.shape[1], h.shape[1]
        y = torch.baddbmm(result.view(n, out_c, -1), w.view(1, out_c, r).expand(n, -1, -1), h.view(n, r, -1))
        if b.bias is not None:
            y = y + (b.bias * s).view(1, -1, 1)
        return y.view(result.shape)

    def make_plan(self, x: torch.Tensor):
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active:
            return self.base_layer
        return _ConvPlan(self, active)

    # Rows split by name in Python, which torch.compile would guard on (a recompile per new mix): run eagerly.
    @torch.compiler.disable
    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """PEFT's LoraLayer._mixed_batch_forward: each adapter's rows of the batch get its contribution."""
        names = [n for n in dict.fromkeys(adapter_names) if n != BASE_NAME and n in self.lora_A]
        if any(self.lora_variant[n].scales_channels for n in names):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            rows = [i for i, item in enumerate(adapter_names) if item == name]
            sub = x[rows].to(self.lora_A[name].weight.dtype)
            result[rows] += self.lora_out(name, self.lora_dropout[name](sub)).to(result.dtype)
        return result

    # --- merging ---------------------------------------------------------------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A as a kernel of the base's shape [out, in, *k], in the adapter's dtype (computed in float32 for 16-bit
        adapters on the CPU, as PEFT does). PEFT convolves Aᵀ with B for kernels larger than 1: the same sums."""
        if self.base_layer.groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = a.dtype
        cast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast:
            a, b = a.float(), b.float()
        r = a.shape[0]
        delta = (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(self.base_layer.weight.shape) * self.scaling[name]
        return delta.to(dtype) if cast else delta

    def check_merge(self, names: list[str]) -> None:
        if names and self.base_layer.groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        super().check_merge(names)

    # --- hot-swapping --------------------------------------------------------------------------------------------
    def factor_shapes(self, r: int) -> dict[tuple[str, str], tuple[int, ...]]:
        k, ones = tuple(self.base_layer.kernel_size), (1,) * len(self.base_layer.kernel_size)
        return {("lora_A", "weight"): (r, self.in_features, *k), ("lora_B", "weight"): (self.out_features, r, *ones),
                ("lora_B", "bias"): (self.out_features,)}

    def hotswap_refusal(self) -> Optional[str]:
        if self.base_layer.groups > 1:  # the rank channels are split into groups: padding them is not built
            return f"it is a grouped {self.kind} (groups={self.base_layer.groups})"
        return None

    # --- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        base, r = base_of(target.module), target.kwargs["r"]
        out_c, ones = base.out_channels, (1,) * (base.weight.dim() - 2)
        if r % base.groups != 0:
            raise ValueError(f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. Currently, "
                             "support is limited to conv layers where the rank is divisible by groups. Either choose "
                             "a different rank or do not target this specific layer.")
        shapes = {"lora_A.weight": (r, base.in_channels, *base.kernel_size),
                  "lora_B.weight": (out_c, r // base.groups, *ones)}
        if config.lora_bias:
            shapes["lora_B.bias"] = (out_c,)
        if config.use_dora:
            shapes["lora_magnitude_vector"] = (1, out_c, *ones)
        return shapes

    def __repr__(self) -> str:
        # PEFT's name for this layer type, which get_layer_status reports.
        return f"lora.{self.kind}" + nn.Module.__repr__(self)[len(type(self).__name__):]


class LoraConv1d(LoraConv):
    conv_type, kind = nn.Conv1d, "Conv1d"


class LoraConv2d(LoraConv):
    conv_type, kind = nn.Conv2d, "Conv2d"


class LoraConv3d(LoraConv):
    conv_type, kind = nn.Conv3d, "Conv3d"
