"""What an (IA)³ layer computes: the base layer with its input (feedforward layers) or its output (the others)
scaled by the active adapters' vectors, multiplied together.

The scale costs one elementwise pass over an activation and no tensor of the weight's size. On a plain dense base
(nn.Linear without hooks) the matmul is `F.linear` on the module's parameters; without autograd (inference) the
output is scaled in place, in the tensor the matmul just made. 4-bit bases follow PEFT's `ia3.Linear4bit` order
(a 16-bit input is scaled and run in float32), except that the output goes back to the input's dtype: PEFT's stays
float32, which a bf16 model then feeds to its next bf16 layer and fails (tests/peft_fast/test_parity_ia3_adapters.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...kernels.common.backend import functorch_active


def scale_of(layer, active: tuple[str, ...]) -> torch.Tensor:
    """The product of the active adapters' vectors, flat, in the first one's dtype (PEFT multiplies in place)."""
    params = layer.ia3_l
    s = params[active[0]].flatten()
    for name in active[1:]:
        nxt = s * params[name].flatten()
        s = nxt if nxt.dtype == s.dtype else nxt.to(s.dtype)
    return s


class IA3Plan:
    """Forward for a fixed set of active adapters, decided once per plan key (TunerLayer.plan)."""

    __slots__ = ("layer", "active", "params", "inplace", "channels")

    def __init__(self, layer, active: tuple[str, ...]):
        self.layer, self.active = layer, active
        # a convolution's vectors, (1, channels, 1, ...): PEFT's conv order, over the channel axis
        self.channels = layer.ia3_l[active[0]].shape if layer.ia3_l[active[0]].dim() > 2 else None
        view = layer.base_view
        # A plain nn.Linear: run its matmul directly (same op as its forward); else call the module.
        self.params = view.module._parameters if view.fused_dense() is not None and not view.fan_in_fan_out else None
        # Without autograd, the base output is a fresh tensor nobody else holds: scale it in place.
        self.inplace = self.params is not None and not torch.is_grad_enabled()

    def base(self, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        if self.params is not None and not (args or kwargs):
            return F.linear(x, self.params["weight"], self.params.get("bias"))
        return self.layer.base_layer(x, *args, **kwargs)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        s = scale_of(layer, self.active)
        if self.channels is not None:
            return self.conv(x, s.view(self.channels), args, kwargs)
        if layer.base_view.quantized:
            return self.quantized(x, s, args, kwargs)
        if layer.is_feedforward:
            dtype = layer.ia3_l[self.active[-1]].dtype
            return self.base((x.to(dtype) * s).to(x.dtype), args, kwargs)
        result = self.base(x, args, kwargs)
        if self.inplace and not (args or kwargs or functorch_active()):  # (vmap refuses in-place steps)
            return result.mul_(s)  # computed in the promoted dtype, stored in result's: PEFT's (result * s).to(...)
        return (result * s).to(result.dtype)

    def conv(self, x: torch.Tensor, s: torch.Tensor, args, kwargs) -> torch.Tensor:
        """PEFT's ia3.Conv2d/Conv3d order (not its Linear one), the vector over the channel axis: the scaled input in
        the base weight's dtype, or the output in the adapter's dtype times the vector; x's dtype at the end."""
        layer = self.layer
        dtype = layer.ia3_l[self.active[-1]].dtype
        if layer.is_feedforward:
            result = layer.base_layer((x.to(dtype) * s).to(layer.base_layer.weight.dtype), *args, **kwargs)
        else:
            result = layer.base_layer(x, *args, **kwargs).to(dtype) * s
        return result.to(x.dtype)

    def quantized(self, x: torch.Tensor, s: torch.Tensor, args, kwargs) -> torch.Tensor:
        """PEFT's 4-bit order: a non-float32 input is scaled and run in float32; the output in the input's dtype."""
        dtype = x.dtype
        convert = not torch.is_autocast_enabled() and dtype != torch.float32
        if convert:
            x = x.float()
        if self.layer.is_feedforward:
            result = self.layer.base_layer(x * s, *args, **kwargs)
        else:
            result = self.layer.base_layer(x, *args, **kwargs) * s
        return result.to(dtype) if convert else result


class IA3Compute:
    """Mixed into the layer: its launch plan."""

    def make_plan(self, x: torch.Tensor):
        active = tuple(a for a in self.active_adapters if a in self.ia3_l)
        if self.merged or not active:
            return self.base_layer
        return IA3Plan(self, active)

    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        raise ValueError("IA3 adapters do not support mixed adapter batches (`adapter_names`): Hugging Face PEFT "
                         "ignores the argument for them and runs the active adapter(s) on every sample. Run one "
                         "batch per adapter with set_adapter(...) instead.")
