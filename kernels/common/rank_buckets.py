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

At decode the weights are streamed from memory and everything else is per-call overhead on cache-cold host state:
so a layer's views of its stacks for a plan's buckets are made once and kept while its stacks live (`_views`),
each bucket writes its rows of the deltas in place (no concatenation), and a batch without padding needs no
reordering.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

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
    padded: bool = True  # False: every adapter fills its bucket's width, so the padded rows are the tokens' rows

    @functools.cached_property
    def key(self) -> tuple:  # what a layer's views of its stacks depend on
        return tuple((b.rank, (b.select.start, b.select.stop, b.select.step) if isinstance(b.select, slice)
                      else tuple(b.select.tolist()))
                     for b in self.buckets)


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
    return BucketPlan(buckets, *(torch.tensor(v, dtype=torch.long) for v in (gather, scatter, tokens, token_slots)),
                      padded=len(gather) != len(tokens))


class _Entry(NamedTuple):
    stack: weakref.ref  # to the A stack
    plans: dict  # (plan.key, id(B stack), id(bias stack)) -> _Kept


class _Kept(NamedTuple):
    b: weakref.ref
    bias: Optional[weakref.ref]
    views: list


# id(a_stack) -> (weak reference to it, {views key: per-bucket views}): the entry goes when the stack does, so it
# never keeps a replaced stack's memory alive. The views read the stacks' current contents; only their shapes and
# strides are kept.
_VIEWS: dict[int, _Entry] = {}
_PLANS_PER_STACK = 16  # mixes remembered per layer; more are rebuilt (cheaply) rather than kept


def _drop(key: int, ref: weakref.ref) -> None:
    entry = _VIEWS.get(key)
    if entry is not None and entry.stack is ref:
        del _VIEWS[key]


def _views(a_stack: Tensor, b_stack: Tensor, bias_stack: Optional[Tensor], plan: BucketPlan) -> list[tuple]:
    """Per bucket (A [n, r, in], Bᵀ [n, r, out], bias [n, 1, out] or None, None), views of the stacks; for
    unevenly spaced slots the views span every slot and the last entry holds the slots to gather. They depend on the
    buckets' ranks and slots alone (plan.key), not on their token counts."""
    entry = _VIEWS.get(id(a_stack))
    if entry is None or entry.stack() is not a_stack:
        entry = _Entry(weakref.ref(a_stack, lambda ref, key=id(a_stack): _drop(key, ref)), {})
        _VIEWS[id(a_stack)] = entry
    key = (plan.key, id(b_stack), id(bias_stack))
    hit = entry.plans.get(key)
    if hit is not None and hit.b() is b_stack and (bias_stack is None or hit.bias() is bias_stack):
        return hit.views
    # Views of detached aliases: a view keeps its base tensor alive, and the stacks themselves must be free to go.
    a, b = a_stack.detach(), b_stack.detach()
    lb = bias_stack.detach() if bias_stack is not None else None
    views = []
    for bk in plan.buckets:
        # Unevenly spaced slots are gathered at each call (a copy of exactly their ranks): kept, it would go stale.
        sel, gather = (bk.select, None) if isinstance(bk.select, slice) else (slice(None), bk.select.to(a.device))
        views.append((a[sel, :bk.rank], b[sel, :, :bk.rank].transpose(1, 2),
                      lb[sel].unsqueeze(1) if lb is not None else None, gather))
    cache = entry.plans
    if len(cache) >= _PLANS_PER_STACK:
        cache.clear()
    cache[key] = _Kept(weakref.ref(b_stack), weakref.ref(bias_stack) if bias_stack is not None else None, views)
    return views


def bucket_deltas(x: Tensor, a_stack: Tensor, b_stack: Tensor, scalings: Tensor, bias_stack: Optional[Tensor],
                  plan: BucketPlan) -> Tensor:
    """The LoRA deltas (lora_B(lora_A(x)) + lora bias) * scaling of plan.tokens, in b_stack's dtype (x is cast to the
    adapters' dtype first, as PEFT casts it)."""
    dev = x.device
    if torch.is_autocast_enabled(dev.type):
        # autocast would run the first bmm in 16 bits and leave the second, which writes into `out=`, in the
        # stacks' dtype (torch refuses the mix): both run in the stacks' dtype, within rounding of PEFT's 16-bit
        # matmuls, as the Triton kernels do
        with torch.autocast(dev.type, enabled=False):
            return bucket_deltas(x, a_stack, b_stack, scalings, bias_stack, plan)
    padded = x.index_select(0, plan.gather.to(dev)).to(a_stack.dtype)
    delta = torch.empty((padded.shape[0], b_stack.shape[1]), dtype=b_stack.dtype, device=dev)
    in_f, out_f = padded.shape[1], delta.shape[1]
    for bk, (a, bt, bias, gather) in zip(plan.buckets, _views(a_stack, b_stack, bias_stack, plan)):
        offset, n, width = bk.offset, bk.n, bk.width
        if gather is not None:
            a, bt = a.index_select(0, gather), bt.index_select(0, gather)
            bias = bias.index_select(0, gather) if bias is not None else None
        # the bucket's rows as [n, in, width] and [n, width, out], each in one view op
        x_t = padded.as_strided((n, in_f, width), (width * in_f, 1, in_f), offset * in_f)
        out = delta.as_strided((n, width, out_f), (width * out_f, out_f, 1), offset * out_f)
        # A·xᵀ: A's rows read in order, at the memory's bandwidth (x·Aᵀ ran ~10% slower here, bench/results/)
        z = torch.bmm(a, x_t).transpose(1, 2)  # [n, width, r]
        if bias is not None:
            torch.baddbmm(bias.to(bt.dtype), z, bt, out=out)
        else:
            torch.bmm(z, bt, out=out)
    if plan.padded:
        delta = delta.index_select(0, plan.scatter.to(dev))
    return delta.mul_(scalings.index_select(0, plan.token_slots.to(dev)).to(delta.dtype).unsqueeze(1))
