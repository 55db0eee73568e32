"""Token-to-adapter metadata of a mixed batch (Punica / S-LoRA / vLLM style), built once per batch and shared by
the shrink and the expand of every layer, plus what their references and launchers share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .tiling import np2


@dataclass
class LoraBatchMeta:
    """Token-to-adapter mapping of one batch. Tensors live on the batch's device; ints are host values."""

    token_slots: Tensor  # int32 [T]: slot of each token, -1 = no adapter
    sorted_tokens: Tensor  # int32 [n_assigned]: indices of tokens with a slot, grouped by slot, in token order
    slot_starts: Tensor  # int32 [n_slots]: where each slot's tokens begin in sorted_tokens
    slot_counts: Tensor  # int32 [n_slots]: how many tokens each slot has
    active_slots: Tensor  # int32 [n_active]: slots with at least one token, increasing
    num_tokens: int  # T
    max_slot_tokens: int  # most tokens of any one slot: sizes the kernels' grids
    n_slots: int

    @property
    def num_active(self) -> int:
        return self.active_slots.numel()


def make_lora_batch_meta(token_slots: Union[Tensor, Sequence[int]], n_slots: int,
                         device: Optional[Union[str, torch.device]] = None) -> LoraBatchMeta:
    """Group the tokens by slot. One host sync (validation and grid sizes), paid once per batch."""
    slots = torch.as_tensor(token_slots, device=device)
    if slots.dim() != 1 or slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
        raise ValueError(f"make_lora_batch_meta: token_slots must be a 1-D integer tensor, got {slots.dtype} "
                         f"of shape {tuple(slots.shape)}")
    n_slots = int(n_slots)
    if n_slots < 0:
        raise ValueError(f"make_lora_batch_meta: n_slots must be >= 0, got {n_slots}")
    T = slots.numel()
    # -1 (and, until validated, anything out of range) sorts last under key n_slots.
    key = torch.where((slots < 0) | (slots >= n_slots), n_slots, slots).long()
    counts = torch.bincount(key, minlength=n_slots + 1)[:n_slots]
    extremes = torch.stack([slots.min(), slots.max()]).long() if T else counts.new_full((2,), -1)
    host = torch.cat([extremes, counts]).tolist()  # the one host sync
    lo, hi, host_counts = host[0], host[1], host[2:]
    if lo < -1 or hi >= n_slots:
        raise ValueError(f"make_lora_batch_meta: token_slots must lie in [-1, {n_slots}) (-1 = no adapter, else a "
                         f"slot of the {n_slots} stacked adapters); got values from {lo} to {hi}")
    order = torch.sort(key, stable=True).indices  # stable: a slot's tokens keep their batch order
    active = [s for s, c in enumerate(host_counts) if c > 0]
    return LoraBatchMeta(
        token_slots=slots.to(torch.int32).contiguous(),
        sorted_tokens=order[:sum(host_counts)].to(torch.int32).contiguous(),
        slot_starts=(torch.cumsum(counts, 0) - counts).to(torch.int32),
        slot_counts=counts.to(torch.int32),
        active_slots=torch.tensor(active, dtype=torch.int32).to(slots.device),
        num_tokens=T,
        max_slot_tokens=max(host_counts, default=0),
        n_slots=n_slots,
    )


def slot_rows(meta: LoraBatchMeta) -> list[tuple[int, Tensor]]:
    """(slot, token indices) of every active slot, on the host: the references are allowed to sync."""
    starts, counts = meta.slot_starts.tolist(), meta.slot_counts.tolist()
    return [(s, meta.sorted_tokens[starts[s]:starts[s] + counts[s]].long()) for s in meta.active_slots.tolist()]


def block_m(max_slot_tokens: int) -> int:
    # tl.dot needs every block dim >= 16; 64 tokens per tile is where prefill tiles stop gaining reuse of A.
    return min(64, max(16, np2(max_slot_tokens)))


def check_launch(op: str, *ts: Optional[Tensor]) -> None:
    """Kernels take raw pointers: every tensor on the first one's device, and no autograd graph to honour."""
    present = [t for t in ts if t is not None]
    if any(t.device != present[0].device for t in present):
        raise ValueError(f"{op}: all tensors (batch metadata included) must be on one device, got "
                         f"{sorted({str(t.device) for t in present})}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        raise RuntimeError(f"{op}: the Triton multi-adapter path is inference-only and has no backward; run mixed "
                           "adapter batches under torch.no_grad() / torch.inference_mode(), or use the reference.")


def apply_slot_delta(y: Tensor, rows: Tensor, delta: Tensor, dora_scale: Optional[Tensor], s: int,
                     base_bias: Optional[Tensor]) -> None:
    """y[rows] += delta, or PEFT's DoRA update of y[rows] for slot s when dora_scale is given (the references)."""
    if dora_scale is None:
        y[rows] += delta.to(y.dtype)
        return
    c = dora_scale[s]
    base = y[rows]
    base_nb = base - base_bias if base_bias is not None else base
    y[rows] = (base + (c - 1) * base_nb + c * delta).to(y.dtype)
