"""LoKrLayer: PEFT's LoKr layer (`lokr.Linear`, `lokr.Conv2d`, `lokr.Conv1d` in one class).

ΔW = kron(w1, w2) · alpha / r, reshaped to the base weight. out = a·b and in = c·d are factored
(`factorization`); w1 is [a, c] (or w1_a·w1_b with decompose_both and a small rank), w2 is [b, d] on Linear,
[b, d, *kernel] on convolutions (or w2_a·w2_b, flattened over the kernel, when r < max(b, d) / 2; with
use_effective_conv2d a CP core t2 [r, r, *kernel] instead). The ops (torch.kron, einsum, reshapes) are PEFT's,
so that ΔW has PEFT's layout for every kind of base, Conv1d's included (where PEFT 0.21.2 itself fails with
use_effective_conv2d on kernels larger than 1: see `delta`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ..lycoris.layer import LycorisLayer


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m·n = dimension: m = factor when it divides dimension, else the largest divisor pair
    reachable while m + n shrinks and m stays <= factor (-1: no bound, i.e. near the square root). PEFT's rule."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


class LoKrLayer(LycorisLayer):
    tuner_name = "LoKr"
    repr_prefix = "lokr"
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    @classmethod
    def adapter_shapes(cls, base: nn.Module, kind: str, config, r: int) -> dict[str, tuple[int, ...]]:
        if kind == "Linear":
            out_dim, in_dim, kernel = base.out_features, base.in_features, ()
        else:
            out_dim, in_dim, kernel = base.out_channels, base.in_channels // base.groups, tuple(base.kernel_size)
        out_l, out_k = factorization(out_dim, config.decompose_factor)
        in_m, in_n = factorization(in_dim, config.decompose_factor)
        shapes: dict[str, tuple[int, ...]] = {}
        if config.decompose_both and r < max(out_l, in_m) / 2:
            shapes.update(lokr_w1_a=(out_l, r), lokr_w1_b=(r, in_m))
        else:
            shapes["lokr_w1"] = (out_l, in_m)
        effective = config.use_effective_conv2d and kind != "Linear" and math.prod(kernel) != 1
        if r >= max(out_k, in_n) / 2:
            shapes["lokr_w2"] = (out_k, in_n, *kernel)
        elif effective:
            # Conv1d gets a [r, r, k, 1] core, so that the 2-d CP rebuild serves it too (as in PEFT).
            core = (r, r, *kernel) if kind == "Conv2d" else (r, r, kernel[0], 1)
            shapes.update(lokr_w2_a=(r, out_k), lokr_w2_b=(r, in_n), lokr_t2=core)
        else:
            shapes.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n * math.prod(kernel)))
        return shapes

    def init_factors(self, name: str, init_weights: Any) -> None:
        """PEFT's three recipes, in PEFT's order (w1 side, w2 side, core): True zeroes w1 (or w1_a), "lycoris"
        zeroes w2 (or w2_b), False draws everything."""
        kaiming = lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # noqa: E731
        zero_w1, zero_w2 = init_weights is True, init_weights == "lycoris"
        if name in self.lokr_w1:
            (nn.init.zeros_ if zero_w1 else kaiming)(self.lokr_w1[name])
        else:
            (nn.init.zeros_ if zero_w1 else kaiming)(self.lokr_w1_a[name])
            kaiming(self.lokr_w1_b[name])
        if name in self.lokr_w2:
            (nn.init.zeros_ if zero_w2 else kaiming)(self.lokr_w2[name])
        elif zero_w2:  # PEFT's "lycoris" recipe zeroes w2_b before drawing w2_a
            nn.init.zeros_(self.lokr_w2_b[name])
            kaiming(self.lokr_w2_a[name])
        else:
            kaiming(self.lokr_w2_a[name])
            kaiming(self.lokr_w2_b[name])
        if name in self.lokr_t2:
            kaiming(self.lokr_t2[name])

    def rank_dropout_mask_dtype(self, delta: torch.Tensor) -> torch.dtype:
        return torch.float32  # PEFT's LoKr mask is float32 whatever the factors' dtype (LoHa's follows them)

    def scales_rank_dropout(self, name: str) -> bool:
        return self.rank_dropout_scale[name]

    def delta(self, name: str) -> torch.Tensor:
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            # A fresh contiguous copy: einsum may give a size-1 trailing dimension (Conv1d's [b, d, k, 1]) a stride
            # that torch.kron's internal view rejects, which makes PEFT 0.21.2 fail on such layers.
            w2 = _cp(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
            w2 = w2.clone(memory_format=torch.contiguous_format)
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2.contiguous()) * self.scaling[name]).reshape(self.base_layer.weight.shape)
