"""The view of peft_fast's own 4-bit layer, NF4Linear (made by peft_fast.quantize)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .nf4_linear import NF4Linear
from .view import BaseView, check_quant_state, compute_cast, dense_linear, has_hooks


class NF4View(BaseView):
    quantized = True

    def fused_nf4(self, x: torch.Tensor):
        m = self.module
        if has_hooks(m):
            return None
        cast = compute_cast(m.compute_dtype, x)
        if cast is False or m.weight.device != x.device:
            return None
        return m.codes(), m.quant_state, m.bias, cast

    def nf4(self):
        return self.module.codes(), self.module.quant_state

    @property
    def adapter_dtype(self) -> Optional[torch.dtype]:
        return None  # whatever dtype the codes are stored in (quant_storage), they are bytes, not the weight's dtype

    @property
    def init_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.module, "compute_dtype", None)

    @property
    def dense_dtype(self) -> torch.dtype:
        return self.module.quant_state.dtype

    def supports_norms(self) -> bool:
        return True

    def dense_weight(self) -> torch.Tensor:
        return self.module.dequantize()

    def read_weight(self) -> torch.Tensor:
        return self.module.dequantize()

    def write_weight(self, weight: torch.Tensor) -> None:
        self.module.requantize(weight)

    def merge_add(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        return weight + delta  # as PEFT's 4-bit merge: the promoted sum, re-quantized afterwards

    def merge_sub(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        return weight - delta

    def mergeable(self) -> bool:
        return True

    def quant_state(self):
        return self.module.quant_state

    def version(self) -> tuple:
        w, qs = self.module.weight, self.module.quant_state
        return (id(w), w.data_ptr(), w._version, w.device, id(qs), id(qs.absmax), qs.absmax.data_ptr())

    def key_objects(self) -> tuple:
        qs = self.module.quant_state
        return (self.module.weight, qs, qs.absmax)

    def dequantized_linear(self, weight: torch.Tensor, bias, dtype=None) -> nn.Linear:
        return dense_linear(weight, bias, self.dense_dtype, self.module.training)

    def check(self, name: str) -> None:
        check_quant_state(self.module, name, self.module.codes(), self.module.quant_state)

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, NF4Linear)
