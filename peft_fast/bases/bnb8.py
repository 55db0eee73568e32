"""The view of a bitsandbytes 8-bit layer (`Linear8bitLt`, LLM.int8()).

Its forward stays bitsandbytes' own (the adapters' delta is added beside it, as PEFT's `lora.bnb.Linear8bitLt`
does). Merges follow PEFT's: the weight dequantized from its int8 rows and scales, the deltas added in the
adapters' dtype, then re-quantized into a new `Int8Params`; bitsandbytes is imported only there.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .view import DenseView, dense_linear


def is_bnb_8bit(module: nn.Module) -> bool:
    return any(c.__name__ == "Linear8bitLt" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


class Bnb8View(DenseView):
    requantizes = True
    bnb_order = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return is_bnb_8bit(module)

    def _scales(self) -> Optional[torch.Tensor]:
        state = getattr(self.module, "state", None)
        if state is not None and state.SCB is None:
            state.SCB = getattr(self.module.weight, "SCB", None)  # as PEFT: the state may not hold them yet
        return state.SCB if state is not None else None

    def mergeable(self) -> bool:
        return type(self.module.weight).__name__ == "Int8Params" and self._scales() is not None

    def read_weight(self) -> torch.Tensor:
        """The weight dequantized as bitsandbytes does (int8 rows times their scales / 127), in float32."""
        import bitsandbytes as bnb

        w = self.module.weight.data
        return bnb.functional.int8_vectorwise_dequant(w, self._scales().to(w.device))

    def write_weight(self, weight: torch.Tensor) -> None:
        """PEFT's re-quantization: a new Int8Params with the old one's settings, quantized on its way to the
        device."""
        import bitsandbytes as bnb

        old = self.module.weight
        self.module.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                               has_fp16_weights=old.has_fp16_weights).to(old.device)
        self.module.state.reset_grads()

    def merge_add(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        return weight.to(delta.dtype) + delta  # PEFT's: the dequantized weight in the delta's dtype, plus the delta

    def merge_sub(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        return weight.to(delta.dtype) - delta

    def version(self) -> tuple:
        w = self.module.weight
        return (id(w), w.data_ptr(), w._version, w.device, w.dtype, id(getattr(self.module.state, "SCB", None)))

    def dequantized_linear(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain nn.Linear holding `weight` in `dtype`: the model's, which an int8 layer does not record (its bias
        does, when it has one; float32 otherwise)."""
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        return dense_linear(weight, bias, dtype, self.module.training)
