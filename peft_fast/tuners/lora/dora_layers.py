"""DoRA on embeddings and convolutions (PEFT's DoraEmbeddingVariant and DoraConv{1,2,3}dVariant), as variants of
LoraEmbedding / LoraConv. The scale c = m / ||W + s·ΔW|| per output channel comes from `kernels.dora_norm`, never
from a dense W + s·ΔW; the variant machinery (eval cache, merge bookkeeping) is dora.py's.

- Embedding: the norm runs over the table's columns (one per embedding dimension): ||Wᵀ + s·B·A|| per row of the
  [embedding_dim, num_embeddings] matrix; the magnitude is [embedding_dim]. Forward, as PEFT:
  y = c ⊙ base(x) + c ⊙ s·Aᵀ[x]·Bᵀ (·embed_scale); merging W ← (W + s·(B·A)ᵀ) ⊙ c (c over the columns).
- Convolutions (groups=1): the norm over each output filter (W viewed [out, in·k...]); the magnitude is
  [1, out, 1, ...] as PEFT's. Forward, as PEFT: y = result + (c - 1)·(result - b) + c·s·B(A(x)); with dropout in
  training, (c - 1)·conv(drop(x), W) instead of (c - 1)·(result - b), and A sees drop(x).
"""
from __future__ import annotations

import torch

from ...kernels import dora_norm
from ...kernels.common.backend import keeps_no_state
from .dora import DoraVariant


def _cached_norm(view, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """dora_norm(weight, a, b, s), with ||weight||² per row kept by the base view while the base is unchanged."""
    compiling = keeps_no_state()
    sq = None if compiling else view.cached_norm_sq()
    norm, sq_new = dora_norm(weight, a, b, s, sq)
    if sq is None and not compiling:
        view.store_norm_sq(sq_new)
    return norm


def _check_floating(layer) -> None:
    w = layer.base_layer.weight
    if not w.dtype.is_floating_point:
        raise NotImplementedError(f"DoRA (use_dora=True) over a {type(layer.base_layer).__name__} base with {w.dtype} "
                                  "weights is not supported: it needs a floating-point weight.")


class DoraEmbeddingVariant(DoraVariant):
    def check(self, layer, config) -> None:
        _check_floating(layer)

    def row_norm(self, layer, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        return _cached_norm(layer.base_view, layer.base_layer.weight.detach().T, a, b, s)

    def orient(self, layer, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1)  # the table is [num_embeddings, embedding_dim]: c scales its columns

    @staticmethod
    def _merge_norm(layer, name: str, unmerged: torch.Tensor) -> torch.Tensor:
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        norm, _ = dora_norm(unmerged.T, a.detach(), b.detach(), float(layer.scaling[name]))
        return norm.to(torch.promote_types(unmerged.dtype, a.dtype))

    def add_embedding(self, layer, name: str, x: torch.Tensor, result: torch.Tensor, scale) -> torch.Tensor:
        c = self.scale(layer, name)
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        dora = c * (layer.embed(x, a.T) @ b.T) * layer.scaling[name]
        if scale is not None:
            dora = dora * scale.to(dora.dtype)
        return c * result + dora


class DoraConvVariant(DoraVariant):
    def check(self, layer, config) -> None:
        _check_floating(layer)
        groups = layer.base_layer.groups
        if groups > 1:
            # PEFT 0.21 views the grouped lora_B as [out / groups, r] when it computes the norm: not the layer's ΔW.
            raise ValueError(f"use_dora=True is not supported by peft_fast on a {type(layer.base_layer).__name__} with "
                             f"groups={groups} (PEFT's DoRA norm is wrong there); set use_dora=False for it or leave "
                             "the layer out of target_modules.")

    def row_norm(self, layer, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        w = layer.base_layer.weight.detach()
        r = a.shape[0]
        norm = _cached_norm(layer.base_view, w.reshape(w.shape[0], -1), a.reshape(r, -1), b.reshape(-1, r), s)
        return norm.view(1, -1, *([1] * (w.dim() - 2)))  # PEFT's magnitude shape

    def orient(self, layer, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (layer.base_layer.weight.dim() - 1)))

    @staticmethod
    def _merge_norm(layer, name: str, unmerged: torch.Tensor) -> torch.Tensor:
        a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        r = a.shape[0]
        norm, _ = dora_norm(unmerged.reshape(unmerged.shape[0], -1), a.reshape(r, -1), b.reshape(-1, r),
                            float(layer.scaling[name]))
        return norm.to(torch.promote_types(unmerged.dtype, a.dtype)).view(1, -1, *([1] * (unmerged.dim() - 2)))

    def add_conv(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        c = self.scale(layer, name)
        base = layer.base_layer
        dropout = layer.lora_dropout[name]
        if isinstance(dropout, torch.nn.Identity) or not layer.training:
            bias = base.bias
            base_result = result - bias.view(1, -1, *([1] * (result.dim() - 2))) if bias is not None else result
        else:
            x = dropout(x)
            base_result = base._conv_forward(x, base.weight.to(x.dtype), None)  # x is in the adapter's dtype
        return result + (c - 1) * base_result + c * layer.lora_out(name, x)
