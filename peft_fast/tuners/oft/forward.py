"""What an OFT layer's forward runs: each active adapter's rotation formed once per call (never per token), then
applied in whichever exact way is cheaper. (An embedding's looked-up rows are rotated, or, outside training, looked
up in a cached rotated table.)

- Rotating the input (PEFT's way): x·diag(R₁)·diag(R₂)·... into the base layer. Used in training, for 16-bit and
  4-bit bases (PEFT rounds the rotated input to the base's dtype; folding into a 16-bit weight would round
  differently) and with extra forward arguments. Folding R into W instead and letting autograd differentiate it
  would compute the full [out, in] gradient of the folded weight, an extra matmul as large as the base's.
- In training, over a plain float32/64 nn.Linear with more tokens than output features, one adapter: the weight
  folded in forward (out·in·b, where rotating x costs tokens·in·b and a copy of x) and the rotating path's
  backward (rotation.FoldedLinear), so no gradient of the folded weight is formed.
- Folding into the weight: x·(W·diag(R₂)ᵀ·diag(R₁)ᵀ)ᵀ, one matmul per call, for a plain float32/64 nn.Linear (or a
  1x1 Conv2d) outside training when no gradient is wanted. The folded weight is cached until an adapter's weight or
  the base weight changes identity, storage or version, and the layer's events drop it.
- A Conv2d with a larger kernel always runs the base convolution with the folded weight W·diag(R)ᵀ, which is PEFT's
  merge rule. A deliberate difference: PEFT 0.21.2 instead rotates every stride-1 patch of the input and sums the
  patches back into an image (scrambling kernel and spatial positions on the way), so that in PEFT a freshly
  initialised (identity) adapter already changes the layer's output and merging changes the model; peft_fast's
  forward is PEFT's merged model (tests/peft_fast/test_parity_oft_conv.py shows both).

Outside training, when no gradient is wanted, the rotations themselves are cached the same way (for the rotating
path). COFT's projection (PEFT rewrites the weight before every use) runs first on every call, in training and in
eval, so a cache never serves a rotation of an unprojected weight.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ...kernels.common.autocast import autocast_off
from ...kernels.common.backend import keeps_no_state
from ...names import BASE_NAME
from .rotation import FoldedLinear, blocks_of, fold, project, rotate, rotate_channels, rotation

_FOLDABLE = (torch.float32, torch.float64)


def _param_key(p: torch.Tensor) -> tuple:
    # The storage address too: `p.data = ...` swaps the storage under the same version counter.
    return (id(p), p._version, p.data_ptr())


class OFTPlan:
    """Forward for one set of active adapters. `fold`: the base's parameter dict when the folded weight may replace
    the rotation for inputs like the ones the plan was made for (read at call time); `conv`: a Conv2d with a kernel
    larger than 1, which always runs with the folded weight."""

    __slots__ = ("layer", "active", "fold", "conv")

    def __init__(self, layer, active: list[str], fold: Optional[dict], conv: bool):
        self.layer, self.active, self.fold, self.conv = layer, active, fold, conv

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        for name in self.active:
            project(layer.blocks[name])
        if self.conv:
            return layer.conv_folded(x, self.active)
        if self.fold is not None and not (args or kwargs):
            weight = self.fold["weight"]
            if layer.caches(self.active) and (layer.kind != "Embedding" or layer.base_layer.max_norm is None):
                out = layer.run_folded(x, layer.folded(self.active, weight), self.fold.get("bias"))
                return out if layer.kind == "Embedding" else out.to(x.dtype)  # x's dtype, as PEFT, under autocast
            if layer.kind == "Linear" and len(self.active) == 1 and x.numel() > weight.numel() and \
                    not weight.requires_grad:  # more tokens than output features: folding R into W costs less
                module = layer.blocks[self.active[0]]
                bias = self.fold.get("bias")
                return FoldedLinear.apply(x, blocks_of(module, rotation(module)), weight, bias).to(x.dtype)
        if layer.kind == "Embedding":  # PEFT rotates the looked-up rows
            result = layer.base_layer(x, *args, **kwargs)
            return layer.rotate_input(result, self.active, layer.rotations(self.active))
        rotated = layer.rotate_input(x, self.active, layer.rotations(self.active))
        return layer.base_layer(rotated, *args, **kwargs).to(x.dtype)


class OFTCompute:
    """Mixed into the layer: its launch plans, the rotation of its input and the eval caches."""

    def make_plan(self, x: torch.Tensor):
        active = [a for a in self.active_adapters if a in self.blocks]
        if self.merged or not active:
            return self.base_layer
        conv = self.kind == "Conv2d" and self.kernel != (1, 1)
        return OFTPlan(self, active, None if conv else self.foldable(x, active), conv)

    def foldable(self, x: torch.Tensor, active: list[str]) -> Optional[dict]:
        view = self.base_view
        if self.kind == "Embedding":
            params = view.fused_embedding()
            dtype = params["weight"].dtype if params is not None else None
            if params is None or dtype not in _FOLDABLE or any(self.blocks[n].weight.dtype != dtype for n in active):
                return None
            return params
        if self.kind == "Conv2d":
            fused = view.fused_conv() if self.base_layer.groups == 1 else None
        else:
            fused = view.fused_dense()
        if fused is None or x.dtype not in _FOLDABLE or fused[0].dtype != x.dtype:
            return None
        if any(self.blocks[n].weight.dtype != x.dtype for n in active):
            return None
        return view.module._parameters

    def caches(self, names: list[str]) -> bool:
        """Whether values derived from the adapters are served from the cache: outside training and compiled code,
        when no gradient of the adapters is wanted."""
        if self.training or keeps_no_state():
            return False
        return not (torch.is_grad_enabled() and any(self.blocks[n].weight.requires_grad for n in names))

    def _cached(self, slot: tuple, key: tuple, kept: list, compute):
        hit = self._values.get(slot)
        if hit is None or hit[0] != key:
            with torch.no_grad(), autocast_off(kept[0].device):  # kept for later calls, with or without autocast
                value = compute()
            hit = self._values[slot] = (key, value, kept)  # kept alive: no id in the key can be reused meanwhile
        return hit[1]

    def rotations(self, names: list[str]) -> list[torch.Tensor]:
        """R of each adapter, in its weight's dtype (cached outside training when no gradient is wanted)."""
        def compute():
            return [rotation(self.blocks[n]) for n in names]

        if not self.caches(names):
            return compute()
        weights = [self.blocks[n].weight for n in names]
        return self._cached(("rotations", tuple(names)), tuple(k for w in weights for k in _param_key(w)), weights,
                            compute)

    def rotate_input(self, x: torch.Tensor, names: list[str], rotations: list[torch.Tensor]) -> torch.Tensor:
        """PEFT's loop: x cast to each adapter's dtype and rotated by it, in turn; back in x's dtype (an embedding's
        output goes through the same)."""
        dtype = x.dtype
        for name, r in zip(names, rotations):
            module = self.blocks[name]
            x = x.to(module.weight.dtype)
            r = blocks_of(module, r)
            x = rotate_channels(x, r) if self.kind == "Conv2d" else rotate(x, r)
        return x.to(dtype)

    def folded(self, names: list[str], weight: torch.Tensor) -> torch.Tensor:
        """W·diag(R_n)ᵀ·...·diag(R_1)ᵀ in W's layout and dtype (computed in the adapters' dtype, as PEFT merges), so
        that x·R₁·...·R_n·Wᵀ = x·foldedᵀ (an embedding table: W·diag(R₁)·...·diag(R_n), its rows rotated as
        PEFT rotates the looked-up ones); cached outside training when no gradient is wanted."""
        def compute():
            dtype = self.blocks[names[0]].weight.dtype
            w = weight.reshape(weight.shape[0], -1).to(dtype)
            if self.kind == "Embedding":  # the looked-up rows rotated in turn: the table's rows are
                for name in names:
                    w = rotate(w, blocks_of(self.blocks[name], rotation(self.blocks[name])))
            else:
                for name in reversed(names):
                    w = fold(w, blocks_of(self.blocks[name], rotation(self.blocks[name])))
            return w.reshape(weight.shape).to(weight.dtype)

        if not self.caches(names):
            return compute()
        weights = [self.blocks[n].weight for n in names]
        key = tuple(k for w in weights for k in _param_key(w)) + self.base_view.version()
        return self._cached(("folded", tuple(names)), key, weights + [weight], compute)

    def conv_folded(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """A Conv2d (kernel larger than 1) with the adapters folded into its weight: PEFT's merged layer."""
        m = self.base_layer
        return m._conv_forward(x, self.folded(names, m.weight), m.bias).to(x.dtype)

    def run_folded(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The base layer's operation with the folded weight."""
        m = self.base_layer
        if self.kind == "Linear":
            return F.linear(x, weight, bias)
        if self.kind == "Conv2d":
            return m._conv_forward(x, weight, bias)
        return F.embedding(x, weight, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, m.sparse)

    # Rows split by name in Python, which torch.compile would guard on (a recompile per new mix): run eagerly.
    @torch.compiler.disable
    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each sample through the adapter it names ("__base__": none). PEFT 0.21.2 ignores `adapter_names` for OFT
        (every sample gets the active adapters); here each gets its own, as LoRA's mixed batches do: rotated inputs
        and one base call for the batch; an embedding's rows rotated after the lookup; on a Conv2d with a larger
        kernel, each adapter's folded convolution on its rows."""
        names = [n for n in dict.fromkeys(adapter_names) if n != BASE_NAME and n in self.blocks]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        rows = {n: [i for i, a in enumerate(adapter_names) if a == n] for n in names}
        for name in names:
            project(self.blocks[name])
        if self.kind == "Embedding" or (self.kind == "Conv2d" and self.kernel != (1, 1)):
            result = self.base_layer(x, *args, **kwargs)
            for name in names:
                part = self.conv_folded(x[rows[name]], [name]) if self.kind == "Conv2d" else \
                    self.rotate_input(result[rows[name]], [name], self.rotations([name]))
                result[rows[name]] = part.to(result.dtype)
            return result
        rotated = x.clone()
        for name in names:
            rotated[rows[name]] = self.rotate_input(x[rows[name]], [name], self.rotations([name]))
        return self.base_layer(rotated, *args, **kwargs).to(x.dtype)

    def _clear_caches(self) -> None:
        self._values = {}

    def __getstate__(self):
        state = super().__getstate__()
        state["_values"] = {}
        return state
