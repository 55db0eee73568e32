"""A mixed batch on the CPU references without a loop over adapters: the adapters present are grouped by rank, each
group's tokens are padded to its largest token count, and each group costs two batched matmuls (bmm) instead of two
matmuls per adapter. At decode, where every adapter has a token or two, the per-adapter loop is all call overhead:
32 sequences over 32 adapters cost 1,792 small matmuls a step in a 4-layer model, two per adapter in each of its 28
adapted layers (bench/test_bench_multi_lora.py).

A group reads only its adapters' own ranks (the stacks' padding beyond a rank is never read, as in the kernels):
the slots of one rank are a strided view of the stacks when evenly spaced (one slot, consecutive slots, every k-th
slot), and a gathered copy of exactly those ranks otherwise. The result equals the per-adapter loop's within float
rounding (bmm instead of mm); the loop stays for batches with one adapter per rank, or too uneven to pad. The plan
(which token goes where) depends on the batch and the ranks alone, so the layers of one forward share it
(LoraBatchMeta.plan), and a layer's work is one gather of x, two bmm per rank, and one scatter into y.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

# Padding a group's tokens to its largest count may at most double the rows multiplied; past that, loop.
MAX_PAD_FACTOR = 2


@dataclass
class Bucket:  # the adapters of one rank
    rank: int
    select: Union[slice, Tensor]  # their slots in the stacks: a slice when evenly spaced (a view), else indices
    n: int  # how many
    width: int  # the largest token count among them: rows per slot in the padded batch
    offset: int  # where its padded rows start among all buckets'


@dataclass
class BucketPlan:
    buckets: list[Bucket]
    gather: Tensor  # int64: the token of each padded row (token 0 for padding: rows are independent, and the
    # padding's results are never scattered back)
    scatter: Tensor  # int64: the padded row of each token the buckets hold
    tokens: Tensor  # int64: those tokens, in that order (where the deltas go)
    token_slots: Tensor  # int64: their slots


def _select(slots: list[int]) -> Union[slice, Tensor]:
    step = slots[1] - slots[0] if len(slots) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(slots, slots[1:])):
        return slice(slots[0], slots[-1] + 1, step)
    return torch.tensor(slots)


def bucket_plan(groups: list[tuple[int, int, int, int]], sorted_tokens: list[int]) -> Optional[BucketPlan]:
    """The buckets for groups of (slot, start, count, rank), slot s owning sorted_tokens[start:start + count], or
    None where the loop is the better choice: fewer than two groups, one adapter per rank, or padding beyond
    MAX_PAD_FACTOR."""
    if len(groups) < 2:
        return None
    by_rank: dict[int, list[tuple[int, int, int]]] = {}
    for slot, start, count, rank in groups:
        by_rank.setdefault(rank, []).append((slot, start, count))
    padded = sum(len(g) * max(c for _, _, c in g) for g in by_rank.values())
    if len(by_rank) == len(groups) or padded > MAX_PAD_FACTOR * sum(c for *_, c, _ in groups):
        return None  # one adapter per rank: nothing to batch; or too uneven
    buckets, gather, scatter, tokens, token_slots = [], [], [], [], []
    for rank, members in sorted(by_rank.items()):
        width = max(c for _, _, c in members)
        buckets.append(Bucket(rank, _select([s for s, _, _ in members]), len(members), width, len(gather)))
        for slot, start, count in members:
            own = sorted_tokens[start:start + count]
            scatter += range(len(gather), len(gather) + count)
            gather += own + [0] * (width - count)
            tokens += own
            token_slots += [slot] * count
    return BucketPlan(buckets, *(torch.tensor(v, dtype=torch.long) for v in (gather, scatter, tokens, token_slots)))


def _on(select: Union[slice, Tensor], device: torch.device) -> Union[slice, Tensor]:
    return select if isinstance(select, slice) else select.to(device)


def bucket_deltas(x: Tensor, a_stack: Tensor, b_stack: Tensor, scalings: Tensor, bias_stack: Optional[Tensor],
                  plan: BucketPlan) -> Tensor:
    """The LoRA deltas (lora_B(lora_A(x)) + lora bias) * scaling of plan.tokens, in b_stack's dtype (x is cast to the
    adapters' dtype first, as PEFT casts it)."""
    dev = x.device
    padded = x.index_select(0, plan.gather.to(dev)).to(a_stack.dtype)
    deltas = []
    for bk in plan.buckets:
        sel, r = _on(bk.select, dev), bk.rank
        x_b = padded[bk.offset:bk.offset + bk.n * bk.width].view(bk.n, bk.width, -1)
        # A·xᵀ: A's rows read in order, at the memory's bandwidth (x·Aᵀ ran ~10% slower here, bench/results/)
        z = torch.bmm(a_stack[sel, :r], x_b.transpose(1, 2)).transpose(1, 2)  # [n, width, r]: the ranks only
        b = b_stack[sel, :, :r].transpose(1, 2)
        if bias_stack is not None:
            deltas.append(torch.baddbmm(bias_stack[sel].to(b.dtype).unsqueeze(1), z, b).view(bk.n * bk.width, -1))
        else:
            deltas.append(torch.bmm(z, b).view(bk.n * bk.width, -1))
    delta = torch.cat(deltas).index_select(0, plan.scatter.to(dev))
    return delta.mul_(scalings.index_select(0, plan.token_slots.to(dev)).to(delta.dtype).unsqueeze(1))
