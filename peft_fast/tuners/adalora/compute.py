"""What an AdaLoRA layer computes: y = base(x) + s·B·((A ⊙ E)·dropout(x)), s = lora_alpha / (ranknum + 1e-5), summed
over the active adapters in PEFT's order, the delta never formed as an [out, in] matrix.

- Training (or gradients wanted): PEFT's loop after the base output, with the scale applied to the [tokens, r]
  product instead of twice to the [tokens, out] one (PEFT multiplies by s, then divides by ranknum, then adds):
  one addmm into the base output. A Conv2d's delta runs as a convolution with A ⊙ E (r output channels) and a
  1x1 convolution with s·B, where PEFT convolves with the full [out, in, k, k] product B·(A ⊙ E). 4-bit bases keep
  PEFT's 4-bit order (the delta rounded to the output dtype before it is scaled).
- Inference (eval, no gradient wanted) over a plain dense base: the kept ranks only (E ≠ 0; pruned ranks add
  exact zeros in PEFT) with s folded into A, cached until A, E, B or ranknum change identity, storage or version,
  then one base matmul plus a rank-r addmm in place. On CUDA a single adapter runs LoRA's fused Triton op.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import lora_linear_triton, use_triton
from ...kernels.common.backend import keeps_no_state
from ...names import BASE_NAME


def _param_key(p: torch.Tensor) -> tuple:
    # The storage address too: `p.data = ...` swaps the storage under the same version counter.
    return (id(p), p._version, p.data_ptr())


class AdaLoraPlan:
    """Forward for one set of active adapters; `dense`: the base's parameter dict when its matmul may be run
    directly (a plain dense base), read at call time."""

    __slots__ = ("layer", "active", "dense", "transposed")

    def __init__(self, layer, active: list[str], dense: Optional[dict], transposed: bool):
        self.layer, self.active, self.dense, self.transposed = layer, active, dense, transposed

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer, dense = self.layer, self.dense
        if dense is None or args or kwargs:
            return layer.loop(x, layer.base_layer(x, *args, **kwargs), self.active)
        w = dense["weight"].T if self.transposed else dense["weight"]
        a = layer.lora_A[self.active[0]]
        if len(self.active) == 1 and use_triton(x, w, a):
            return layer.fused_triton(x, w, dense.get("bias"), self.active[0])
        base = F.linear(x, w, dense.get("bias"))
        if layer.caches(self.active):
            return layer.infer(x, base, self.active)
        return layer.loop(x, base, self.active)


class AdaLoraCompute:
    """Mixed into the layer: its launch plans, PEFT's adapter loop and the inference cache."""

    def make_plan(self, x: torch.Tensor):
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active:
            return self.base_layer
        view = self.base_view
        dense = view.fused_dense() if self.kind == "Linear" else None
        return AdaLoraPlan(self, active, view.module._parameters if dense is not None else None,
                           view.fan_in_fan_out)

    def caches(self, names: list[str]) -> bool:
        """Outside training and compiled code, when no gradient of the adapters is wanted."""
        if self.training or keeps_no_state():
            return False
        return not (torch.is_grad_enabled() and any(getattr(self, d)[n].requires_grad
                                                    for n in names for d in ("lora_A", "lora_E", "lora_B")))

    def scale(self, name: str) -> torch.Tensor:
        """lora_alpha / (ranknum + 1e-5), a one-element tensor as PEFT computes it."""
        return self.scaling[name] / (self.ranknum[name] + 1e-5)

    # --- training: PEFT's loop -----------------------------------------------------------------------------------
    def loop(self, x: torch.Tensor, result: torch.Tensor, active: list[str]) -> torch.Tensor:
        quantized = self.base_view.quantized
        if quantized:
            result = result.clone()  # PEFT's 4-bit layer clones the base output before adding to it
        for name in active:
            if self.r[name] == 0:  # an empty adapter adds exact zeros
                continue
            a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            x = x.to(a.dtype)
            xa = self.lora_dropout[name](x)
            if self.kind == "Conv2d":
                result = (result + self._conv_delta(xa, a * e, b, name)).to(result.dtype)  # PEFT's in-place +=
                continue
            z = F.linear(xa, a * e)
            if quantized:  # PEFT's 4-bit order: the delta cast to the output dtype, then scaled
                result = (result + F.linear(z, b).to(result.dtype) * self.scaling[name] /
                          (self.ranknum[name] + 1e-5)).to(result.dtype)
            elif result.dtype == z.dtype:
                scaled = (z * self.scale(name)).reshape(-1, z.shape[-1])
                result = torch.addmm(result.reshape(-1, result.shape[-1]), scaled, b.t()).view(result.shape)
            else:  # a 16-bit base under float32 adapters: PEFT's float32 delta, added in the output dtype
                result = (result + F.linear(z, b) * self.scaling[name] / (self.ranknum[name] + 1e-5)).to(result.dtype)
        return result

    def _conv_delta(self, xa: torch.Tensor, ae: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
        """conv(x, B·(A ⊙ E)·s) as conv(conv(x, A ⊙ E), s·B): r channels in between, never the full kernel."""
        m = self.base_layer
        z = F.conv2d(xa, ae.reshape(ae.shape[0], -1, *m.kernel_size), None, m.stride, m.padding, m.dilation)
        return F.conv2d(z, (b * self.scale(name)).reshape(*b.shape, 1, 1))

    # --- inference: the kept ranks, scaled, cached ---------------------------------------------------------------
    def compact(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """((A ⊙ E)·s over the kept ranks, B over them), contiguous; cached until a tensor changes."""
        parts = (self.lora_A[name], self.lora_E[name], self.lora_B[name], self.ranknum[name])
        key = tuple(k for p in parts for k in _param_key(p))
        hit = self._values.get(name)
        if hit is not None and hit[0] == key and not keeps_no_state():
            return hit[1]
        with torch.no_grad():
            a, e, b, _ = parts
            kept = (e.view(-1) != 0).nonzero().view(-1)
            pair = ((a[kept] * e[kept] * self.scale(name)).contiguous(), b[:, kept].contiguous())
        if not keeps_no_state():
            self._values[name] = (key, pair, parts)  # kept alive: no id in the key can be reused meanwhile
        return pair

    def infer(self, x: torch.Tensor, result: torch.Tensor, active: list[str]) -> torch.Tensor:
        """The base output `result` (fresh, needing no autograd) plus each adapter's kept ranks, in place."""
        for name in active:
            a, b = self.compact(name)
            if a.shape[0] == 0:
                continue
            xa = x if x.dtype == a.dtype else x.to(a.dtype)
            if result.dtype == a.dtype:
                result.view(-1, result.shape[-1]).addmm_(F.linear(xa, a).view(-1, a.shape[0]), b.t())
            else:  # a 16-bit base under float32 adapters: PEFT's float32 sum, rounded to the output dtype
                result = (result + F.linear(F.linear(xa, a), b)).to(result.dtype)
            x = xa  # PEFT keeps x cast to the last adapter's dtype
        return result

    def fused_triton(self, x: torch.Tensor, w: torch.Tensor, bias, name: str) -> torch.Tensor:
        """One adapter over a dense base on CUDA: LoRA's fused op, A ⊙ E as its A (its dropout from a seed)."""
        if self.caches([name]):
            a, b = self.compact(name)
            return lora_linear_triton(x, w, bias, a, b, 1.0)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return lora_linear_triton(x, w, bias, self.lora_A[name] * self.lora_E[name], self.lora_B[name],
                                  self.scale_value(name), p)

    def scale_value(self, name: str) -> float:
        """The scale as a Python float for the fused op, read from the device once per ranknum value."""
        ranknum = self.ranknum[name]
        key = _param_key(ranknum)
        hit = self._values.get(("scale", name))
        if hit is None or hit[0] != key:
            hit = self._values[("scale", name)] = (key, float(self.scale(name)), ranknum)
        return hit[1]

    # Rows split by name in Python, which torch.compile would guard on (a recompile per new mix): run eagerly.
    @torch.compiler.disable
    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each sample through the adapter it names ("__base__": none). PEFT 0.21.2 fails on `adapter_names` for
        AdaLoRA (its layers hand the argument to the base layer) and leaves its hooks behind; here each sample
        gets its own adapter, as LoRA's mixed batches do."""
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name == BASE_NAME or name not in self.lora_A:
                continue
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            result[rows] = self.loop(x[rows], result[rows], [name])
        return result

    def _clear_caches(self) -> None:
        self._values = {}

    def __getstate__(self):
        state = super().__getstate__()
        state["_values"] = {}
        return state
