"""Token-to-adapter metadata of a mixed batch (Punica / S-LoRA / vLLM style), built once per batch and shared by
the shrink and the expand of every layer, plus what their references and launchers share.

The kernels' grids come from a tile table (vLLM's "align block size"): each slot's tokens are cut into block_m-row
tiles, and tile i of the table names its slot and first row. The table is as long as the most tiles any split of the
batch can need (cdiv(T, block_m) + n_slots), so its shape, and the grid, never depend on which adapters the batch
holds; tiles past the real ones name slot n_slots and their programs return at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .tiling import cdiv


@dataclass
class LoraBatchMeta:
    """Token-to-adapter mapping of one batch. Every tensor has a shape fixed by (T, n_slots, block_m) alone and is
    built with device ops: no host sync, nothing data-dependent for torch.compile or CUDA graphs to trip on."""

    token_slots: Tensor  # int32 [T]: slot of each token, -1 = no adapter
    sorted_tokens: Tensor  # int32 [T]: token indices grouped by slot, in token order; tokens without a slot last
    slot_starts: Tensor  # int32 [n_slots]: where each slot's tokens begin in sorted_tokens
    slot_counts: Tensor  # int32 [n_slots]: how many tokens each slot has
    tile_slots: Tensor  # int32 [max_tiles]: the slot of each block_m-row tile of a slot's tokens; n_slots past the end
    tile_rows: Tensor  # int32 [max_tiles]: the tile's first row among its slot's tokens
    num_tokens: int  # T
    n_slots: int
    block_m: int  # tile height, chosen from T and n_slots: the kernels' BLOCK_M
    # per-batch caches: a copy of the metadata (dataclasses.replace) starts its own
    _host: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def host_groups(self) -> tuple[list[int], list[int], Tensor]:
        """(slot starts, slot counts, the sorted rows that have a slot) on the host, read once per batch and kept:
        the references (CPU) use them; every layer of one forward shares the metadata."""
        if self._host is None:
            starts, counts = self.slot_starts.tolist(), self.slot_counts.tolist()
            self._host = (starts, counts, self.sorted_tokens[:sum(counts)].long())
        return self._host

    def plan(self, key, make: Callable):
        """make() once per batch and key (what the plan depends on besides the batch): the layers of one forward
        share it."""
        if key not in self._plans:
            self._plans[key] = make()
        return self._plans[key]

    @property
    def max_tiles(self) -> int:
        """Tiles the grids are launched for: enough for any split of T tokens among n_slots slots."""
        return self.tile_slots.numel()


def make_lora_batch_meta(token_slots: Union[Tensor, Sequence[int]], n_slots: int,
                         device: Optional[Union[str, torch.device]] = None, *, validate: bool = True) -> LoraBatchMeta:
    """Group the tokens by slot with device ops of static shape. `validate` checks the slots lie in [-1, n_slots),
    which costs one host sync: callers that made the slots themselves (the layers) pass False."""
    # (a Python list is read as int64: an empty one would otherwise come out float32)
    slots = torch.as_tensor(token_slots, device=device, dtype=None if isinstance(token_slots, Tensor) else torch.long)
    if slots.dim() != 1 or slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
        raise ValueError(f"make_lora_batch_meta: token_slots must be a 1-D integer tensor, got {slots.dtype} "
                         f"of shape {tuple(slots.shape)}")
    n_slots = int(n_slots)
    if n_slots < 0:
        raise ValueError(f"make_lora_batch_meta: n_slots must be >= 0, got {n_slots}")
    T = slots.numel()
    if validate and T:
        lo, hi = torch.stack([slots.min(), slots.max()]).tolist()
        if lo < -1 or hi >= n_slots:
            raise ValueError(f"make_lora_batch_meta: token_slots must lie in [-1, {n_slots}) (-1 = no adapter, else "
                             f"a slot of the {n_slots} stacked adapters); got values from {lo} to {hi}")
    # -1 (and anything out of range) sorts last under key n_slots.
    key = torch.where((slots < 0) | (slots >= n_slots), n_slots, slots).long()
    counts = torch.zeros(n_slots + 1, dtype=torch.long, device=slots.device).scatter_add_(0, key,
                                                                                         torch.ones_like(key))
    counts = counts[:n_slots]
    order = torch.sort(key, stable=True).indices  # stable: a slot's tokens keep their batch order
    bm = block_m(cdiv(T, max(n_slots, 1)))
    tiles = (counts + bm - 1) // bm
    ends = torch.cumsum(tiles, 0)
    t = torch.arange(cdiv(T, bm) + n_slots, device=slots.device)
    tile_slots = torch.searchsorted(ends, t, right=True)  # n_slots past the last tile
    first = (ends - tiles)[tile_slots.clamp(max=max(n_slots - 1, 0))] if n_slots else t
    return LoraBatchMeta(
        token_slots=slots.to(torch.int32).contiguous(),
        sorted_tokens=order.to(torch.int32).contiguous(),
        slot_starts=(torch.cumsum(counts, 0) - counts).to(torch.int32),
        slot_counts=counts.to(torch.int32),
        tile_slots=tile_slots.to(torch.int32),
        tile_rows=((t - first) * bm).to(torch.int32),
        num_tokens=T,
        n_slots=n_slots,
        block_m=bm,
    )


def slot_rows(meta: LoraBatchMeta) -> list[tuple[int, Tensor]]:
    """(slot, token indices) of every slot that has tokens, on the host: the references are allowed to sync."""
    starts, counts, rows = meta.host_groups()
    return [(s, rows[starts[s]:starts[s] + c]) for s, c in enumerate(counts) if c > 0]


def block_m(tokens_per_slot: int) -> int:
    # tl.dot needs every block dim >= 16; 64 tokens per tile is where prefill tiles stop gaining reuse of A.
    # Comparisons rather than a power of two by bit_length: under torch.compile a symbolic token count then guards
    # on a range (three graphs at most), not on its value (one graph per batch shape).
    return 16 if tokens_per_slot <= 16 else 32 if tokens_per_slot <= 32 else 64


def check_launch(op: str, *ts: Optional[Tensor]) -> None:
    """Kernels take raw pointers: every tensor on the first one's device, and no autograd graph to honour."""
    present = [t for t in ts if t is not None]
    if any(t.device != present[0].device for t in present):
        raise ValueError(f"{op}: all tensors (batch metadata included) must be on one device, got "
                         f"{sorted({str(t.device) for t in present})}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        raise RuntimeError(f"{op}: the Triton multi-adapter path is inference-only and has no backward; run mixed "
                           "adapter batches under torch.no_grad() / torch.inference_mode(), or use the reference.")


def slot_update(y_rows: Tensor, delta: Tensor, dora_scale: Optional[Tensor], s: int,
                base_bias: Optional[Tensor]) -> Tensor:
    """The new rows of y for slot s's tokens (the references): y + delta, or PEFT's DoRA output when dora_scale is
    given."""
    return _update(y_rows, delta, dora_scale[s] if dora_scale is not None else None, base_bias)


def rows_update(y_rows: Tensor, delta: Tensor, dora_scale: Optional[Tensor], row_slots: Tensor,
                base_bias: Optional[Tensor]) -> Tensor:
    """slot_update for rows of several slots at once: row i belongs to slot row_slots[i]."""
    return _update(y_rows, delta, dora_scale.index_select(0, row_slots) if dora_scale is not None else None,
                   base_bias)


def _update(y_rows: Tensor, delta: Tensor, c: Optional[Tensor], base_bias: Optional[Tensor]) -> Tensor:
    if c is None:
        return y_rows + delta.to(y_rows.dtype)
    base_nb = y_rows - base_bias if base_bias is not None else y_rows
    return (y_rows + (c - 1) * base_nb + c * delta).to(y_rows.dtype)
