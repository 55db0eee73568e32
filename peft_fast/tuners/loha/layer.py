"""LoHaLayer: PEFT's LoHa layer (`loha.Linear`, `loha.Conv2d`, `loha.Conv1d` in one class).

ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha / r, reshaped to the base weight. With use_effective_conv2d on a
convolution whose kernel is larger than 1, each factor pair is a CP decomposition with a core t of shape
[r, r, k1, k2] ([r, r, k, 1] for Conv1d): W_i = t_i ×₁ w_i_a ×₂ w_i_b.

Gradients: the plain form runs a custom autograd function that keeps only the four factors and recomputes the two
[out, in] products in backward (as PEFT does, for memory). The CP form runs torch autograd, which differs from
PEFT 0.21.2 on purpose: PEFT's HadaWeightCP.backward builds w1_a's gradient from the second core (t2·w2_b) and w2_a's
from the first, so those two gradients are wrong there (tests/peft_fast/test_parity_loha_conv.py checks ours
against finite differences and the other four against PEFT's).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ..lycoris.layer import LycorisLayer

_PLAIN = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class _Hadamard(torch.autograd.Function):
    """(w1_a·w1_b) ⊙ (w2_a·w2_b) · scale; backward recomputes the products instead of keeping them."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale):
        ctx.save_for_backward(w1a, w1b, w2a, w2b, scale)
        return ((w1a @ w1b) * (w2a @ w2b)) * scale

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b, scale = ctx.saved_tensors
        grad = grad * scale
        g1 = grad * (w2a @ w2b)  # d/d(w1_a·w1_b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


class LoHaLayer(LycorisLayer):
    tuner_name = "LoHa"
    repr_prefix = "loha"
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    @classmethod
    def adapter_shapes(cls, base: nn.Module, kind: str, config, r: int) -> dict[str, tuple[int, ...]]:
        if kind == "Linear":
            out_f, in_f = base.weight.shape
            return {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f), "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_f)}
        kernel = tuple(base.kernel_size)
        out_c, in_c = base.out_channels, base.in_channels // base.groups
        # As PEFT: kernels of size 1 are pointwise matmuls, kept flat whatever use_effective_conv2d says.
        if config.use_effective_conv2d and math.prod(kernel) != 1:
            core = (r, r, *kernel) if kind == "Conv2d" else (r, r, kernel[0], 1)
            return {"hada_w1_a": (r, out_c), "hada_w1_b": (r, in_c), "hada_w2_a": (r, out_c), "hada_w2_b": (r, in_c),
                    "hada_t1": core, "hada_t2": core}
        flat = in_c * math.prod(kernel)
        return {"hada_w1_a": (out_c, r), "hada_w1_b": (r, flat), "hada_w2_a": (out_c, r), "hada_w2_b": (r, flat)}

    def init_factors(self, name: str, init_weights: Any) -> None:
        """PEFT's order and rules (He init, as the FedPara paper); True zeroes w2_b so the adapter starts as a
        no-op. Cores come last."""
        for dict_name in _PLAIN:
            p = getattr(self, dict_name)[name]
            if dict_name == "hada_w2_b" and init_weights:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if name in self.hada_t1:
            nn.init.kaiming_uniform_(self.hada_t1[name], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.hada_t2[name], a=math.sqrt(5))

    def delta(self, name: str) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (getattr(self, d)[name] for d in _PLAIN)
        scale = torch.tensor(self.scaling[name])  # PEFT's 0-dim tensor: the same rounding for 16-bit factors
        if name in self.hada_t1:
            weight = _cp(self.hada_t1[name], w1a, w1b) * _cp(self.hada_t2[name], w2a, w2b) * scale
        else:
            weight = _Hadamard.apply(w1a, w1b, w2a, w2b, scale)
        return weight.reshape(self.base_layer.weight.shape)
