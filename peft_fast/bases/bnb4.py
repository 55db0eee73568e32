"""The view of a bitsandbytes 4-bit layer (Linear4bit, nf4 or fp4), used as bitsandbytes stores it.

bitsandbytes is imported only where its own functions are needed (dequantizing a weight it repacked, re-quantizing
after a merge); a 4-bit layer is recognised by its class name and its weight's `quant_state`.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from ..kernels import nf4_from_bnb, use_triton
from .view import BaseView, check_quant_state, compute_cast, dense_linear, has_hooks


def is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes `Linear4bit` (or LinearNF4 / LinearFP4, its subclasses)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _repacked(qs) -> bool:
    """bitsandbytes repacked the weight for its AVX512-BF16 CPU kernel: a layout of its own, which it computes with."""
    return bool(getattr(qs, "packing_format_for_cpu", False))


class Bnb4View(BaseView):
    quantized = True

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._converted = None  # (weight, quant state, absmax, nested absmax, device, (packed, state)): see nf4()

    def clear(self) -> None:
        super().clear()
        self._converted = None

    def quant_state(self):
        qs = getattr(self.module.weight, "quant_state", None)
        return qs if qs is not None else getattr(self.module, "quant_state", None)  # bnb recovers a lost one

    def nf4(self):
        """(packed, state) of the weight in peft_fast's form, or None when it is not quantized in a form we read.
        Converted once and kept with the objects it came from: a new weight, quant state or absmax (which
        `QuantState.to` swaps in place), or a move, converts again."""
        weight = self.module.weight
        qs = getattr(weight, "quant_state", None)
        if (qs is None and getattr(self.module, "quant_state", None) is not None
                and weight.dtype == getattr(self.module, "quant_storage", torch.uint8) and weight.dim() == 2
                and weight.shape[1] == 1):
            # FSDP2 gathers a bitsandbytes weight into a plain parameter, without the quant state bitsandbytes
            # keeps on the weight; it keeps a copy on the module. Give it back to the parameter FSDP2 uses (rather
            # than letting bitsandbytes' forward replace that parameter with a new Params4bit, which FSDP2 does
            # not manage). The codes are packed [n, 1] in the layer's quant_storage dtype: uint8, or the float
            # type FSDP setups choose (bnb_4bit_quant_storage) so that the codes shard like the other weights.
            qs = weight.quant_state = self.module.quant_state
        if qs is None or _repacked(qs) or len(qs.shape) != 2:
            return None
        nested = qs.state2.absmax if getattr(qs, "nested", False) else None
        c = self._converted
        if (c is None or c[0] is not weight or c[1] is not qs or c[2] is not qs.absmax or c[3] is not nested
                or c[4] != weight.device):
            packed, state = nf4_from_bnb(weight)
            # Once, here: bitsandbytes may keep pieces of a quant state (the codebook, the nested offset) on the
            # CPU, which every call would otherwise copy to the device and wait for.
            c = (weight, qs, qs.absmax, nested, weight.device, (packed, state.to(weight.device)))
            self._converted = c
        return c[5]

    def fused_nf4(self, x: torch.Tensor):
        base = self.module
        if has_hooks(base):
            return None
        q = self.nf4()
        if q is None:
            return None  # not quantized yet, lost (bnb recovers it itself), or repacked for bnb's CPU kernel
        if (x.device.type == "cpu" and getattr(base, "support_avx512bf16_for_cpu", False) and not base.training
                and not x.requires_grad and not use_triton(x)):
            return None  # bnb would repack the weight now and use that kernel: defer to it, as PEFT's layer does
        cast = compute_cast(getattr(base, "compute_dtype", None), x)
        if cast is False or base.weight.device != x.device:
            return None
        return q[0], q[1], base.bias, cast

    @property
    def init_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.module, "compute_dtype", None)

    @property
    def dense_dtype(self) -> torch.dtype:
        qs = self.quant_state()
        return qs.dtype if qs is not None else torch.float32

    def supports_norms(self) -> bool:
        return True

    def dense_weight(self) -> torch.Tensor:
        return self.read_weight()

    def read_weight(self) -> torch.Tensor:
        """The weight dequantized by bitsandbytes (in the quant state's dtype); a weight repacked for bnb's CPU
        kernel is read back through bnb's own inverse first."""
        import bitsandbytes as bnb

        data, qs = self.module.weight.data, self.quant_state()
        if _repacked(qs):  # bnb's inverse rewrites the state it is given: give a copy
            data, qs = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(qs))
        return bnb.functional.dequantize_4bit(data, qs)

    def write_weight(self, weight: torch.Tensor) -> None:
        """PEFT's re-quantization: a new Params4bit with the old one's settings, quantized on the CPU, moved back."""
        import bitsandbytes as bnb

        old = self.module.weight
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_")}
        kwargs.pop("data", None)
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        self.module.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)

    def merge_add(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        return weight + delta  # as PEFT's 4-bit merge: the promoted sum, re-quantized afterwards

    def merge_sub(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        return weight - delta

    def mergeable(self) -> bool:
        return type(self.module.weight).__name__ == "Params4bit" and self.quant_state() is not None

    def _state_tensors(self) -> tuple:
        qs = self.quant_state()
        nested = getattr(qs, "state2", None) if getattr(qs, "nested", False) else None
        return qs, getattr(qs, "absmax", None), (nested.absmax if nested is not None else None)

    def version(self) -> tuple:
        w = self.module.weight
        return (id(w), w.data_ptr(), w._version, w.device, w.dtype,
                *((id(t), t.data_ptr() if isinstance(t, torch.Tensor) else None) for t in self._state_tensors()))

    def key_objects(self) -> tuple:
        return (self.module.weight, *self._state_tensors())

    def dequantized_linear(self, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype=None) -> nn.Linear:
        """A plain nn.Linear in the dtype the layer was loaded in (its inputs' and outputs' dtype)."""
        qs = self.quant_state()
        dtype = qs.original_dtype if _repacked(qs) else qs.dtype
        return dense_linear(weight, bias, dtype, self.module.training)

    def check(self, name: str) -> None:
        """Refuse, naming the layer, a quant state peft_fast cannot use or that does not fit the layer."""
        module = self.module
        qs = getattr(module.weight, "quant_state", None)
        if qs is None:
            return  # not quantized yet (bitsandbytes quantizes on the move to a device): checked when it runs
        qt = getattr(qs, "quant_type", None)
        if qt not in ("nf4", "fp4"):
            raise ValueError(f"Target module {name}: unsupported 4-bit quant type {qt!r}; peft_fast runs "
                             "bitsandbytes' 'nf4' and 'fp4' weights. Re-quantize with bnb_4bit_quant_type='nf4', or "
                             "exclude this module.")
        if _repacked(qs):
            return  # bitsandbytes runs it (see fused_nf4)
        check_quant_state(module, name, *nf4_from_bnb(module.weight))

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return is_bnb_4bit(module)
