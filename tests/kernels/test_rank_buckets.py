"""kernels/common/rank_buckets.py: the reference's batched form of a mixed batch (adapters grouped by rank, two bmm
per group) against the per-adapter loop it replaces and the formula token by token, in float64: NaN beyond each
slot's rank (never read), evenly and unevenly spaced slots of one rank, uneven token counts, slot -1 and rank-0
slots, lora bias, DoRA scales; and which batches take it."""
import sys

import pytest
import torch
from mixed_formula import by_hand

from peft_fast.kernels import make_lora_batch_meta, multi_lora_reference
from peft_fast.kernels.common import rank_buckets
from peft_fast.kernels.common.rank_buckets import bucket_plan


def _case(slots, ranks, in_f=13, out_f=11, *, bias=False, dora=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    n, r_max = len(ranks), max(ranks) + 2
    a, b = rnd(n, r_max, in_f), rnd(n, out_f, r_max)
    for s, r in enumerate(ranks):
        a[s, r:] = float("nan")
        b[s, :, r:] = float("nan")
    lb = rnd(n, out_f) if bias else None
    c = rnd(n, out_f).abs() + 0.5 if dora else None
    if lb is not None:
        lb[[s for s, r in enumerate(ranks) if r == 0]] = float("nan")  # an absent adapter's bias is never applied
    slots = torch.tensor(slots)
    return dict(x=rnd(len(slots), in_f), y=rnd(len(slots), out_f), a=a, b=b,
                ranks=torch.tensor(ranks, dtype=torch.int32),
                scal=torch.rand(n, generator=g, dtype=torch.float64) + 0.5, lb=lb, c=c,
                bb=rnd(out_f) if dora else None, meta=make_lora_batch_meta(slots, n))


def _run(k):
    return multi_lora_reference(k["x"], k["y"], k["a"], k["b"], k["ranks"], k["scal"], k["meta"], k["lb"],
                                dora_scale=k["c"], base_bias=k["bb"])


def _took(k) -> bool:
    return any(p is not None for p in k["meta"]._plans.values())


CASES = {
    # 8 slots, ranks (4, 2) alternating: every other slot, a strided view of the stacks
    "strided": ([0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0, -1, -1], [4, 2] * 4),
    # ranks in no pattern: the slots of a rank are gathered
    "gathered": ([5, 0, 3, 1, 4, 2, 0, 3, 5, 1, 2, 4, -1], [3, 3, 1, 3, 1, 1]),
    # one rank: consecutive slots; token counts 1 to 2 per slot
    "one rank": ([0, 1, 2, 3, 0, 2, -1, 3], [5, 5, 5, 5]),
    # a rank-0 slot (this layer lacks that adapter) and tokens without an adapter keep y exactly
    "rank 0": ([0, 1, 2, 3, 1, 3, -1, 2], [2, 0, 2, 2]),
}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "lora_bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_buckets_match_the_loop_and_the_formula(case, bias, dora, monkeypatch):
    slots, ranks = CASES[case]
    k = _case(slots, ranks, bias=bias, dora=dora)
    got = _run(k)
    assert _took(k), "the batched form did not run"
    loop_k = _case(slots, ranks, bias=bias, dora=dora)
    monkeypatch.setattr(rank_buckets, "MAX_PAD_FACTOR", 0)  # the control: every batch loops
    loop = _run(loop_k)
    assert not _took(loop_k)
    assert not got.isnan().any(), "the padding beyond a rank (NaN) was read"
    torch.testing.assert_close(got, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, by_hand(k), rtol=1e-12, atol=1e-12)
    keep = torch.tensor([s < 0 or ranks[s] == 0 for s in slots])
    assert torch.equal(got[keep], k["y"][keep])


def test_inplace_and_float32():
    slots, ranks = CASES["strided"]
    k = _case(slots, ranks, bias=True)
    k32 = {n: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in k.items()}
    y = k32["y"].clone()
    got = multi_lora_reference(k32["x"], y, k32["a"], k32["b"], k32["ranks"], k32["scal"], k32["meta"], k32["lb"],
                               inplace=True)
    assert got is y and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), by_hand(k), rtol=1e-5, atol=1e-5)


def test_which_batches_take_it():
    def plan(slots, ranks):
        k = _case(slots, ranks)
        _run(k)
        return next(iter(k["meta"]._plans.values()))

    assert plan([0, 1, 2, 3], [2, 2, 2, 2]) is not None
    assert plan([0, 1, 2, 3], [1, 2, 3, 4]) is None  # every rank different: nothing to batch
    assert plan([0, 0, 0, 0, 0, 0, 0, 1, 2], [2, 2, 2]) is None  # padding to 7 rows a slot: 21 rows for 9 tokens
    assert plan([0, 0, 0, 0, 0, 0, 1, 2, 2], [2, 2, 2]) is not None  # 18 for 9: at most twice
    assert plan([0, 0, 0, 0, 0, 0, 0], [2, 2]) is None  # one adapter present
    p = plan([0, 2, 4, 1, 3], [2, 1, 2, 1, 2])
    assert [(b.rank, b.select, b.offset) for b in p.buckets] == [(1, slice(1, 4, 2), 0), (2, slice(0, 5, 2), 2)]
    assert p.tokens.tolist() == [3, 4, 0, 1, 2] and p.token_slots.tolist() == [1, 3, 0, 2, 4]
    assert p.gather.tolist() == p.tokens.tolist() and p.scatter.tolist() == [0, 1, 2, 3, 4]
    p = plan([1, 0, 1, -1, 2, 2], [3, 3, 3])  # widths 2: slot 0 pads one row (token 0's, never scattered back)
    assert p.gather.tolist() == [1, 0, 0, 2, 4, 5] and p.scatter.tolist() == [0, 2, 3, 4, 5]


def test_the_layers_of_one_forward_share_a_plan(monkeypatch):
    calls = []
    real = rank_buckets.bucket_plan
    module = sys.modules["peft_fast.kernels.multi_lora"]  # the package's `multi_lora` is the function
    monkeypatch.setattr(module, "bucket_plan", lambda *a: calls.append(1) or real(*a))
    slots, ranks = CASES["strided"]
    k = _case(slots, ranks)
    for _ in range(3):  # three layers, one batch
        _run(k)
    assert len(calls) == 1
    assert bucket_plan([(0, 0, 1, 2), (1, 1, 1, 2)], [1, 0]) is not None


def _loop(monkeypatch, k):
    with monkeypatch.context() as m:
        m.setattr(rank_buckets, "MAX_PAD_FACTOR", 0)
        return _run({**k, "meta": make_lora_batch_meta(k["meta"].token_slots, k["meta"].n_slots)})


@pytest.mark.parametrize("layers", [[(2, 2, 1, 1), (1, 2, 1, 2), (2, 1, 2, 1)],
                                    [(3, 3, 5, 5, "r_max 4"), (3, 3, 5, 5)]], ids=["other ranks", "other r_max"])
def test_one_batch_through_layers_of_other_ranks(layers, monkeypatch):
    """The layers of a forward share the batch's plans, keyed by what a plan depends on besides the batch: each
    layer's ranks, and its r_max (ranks beyond it are clamped)."""
    slots = [0, 1, 2, 3, 3, 2, 1, 0, -1]
    meta = make_lora_batch_meta(torch.tensor(slots), 4)
    for i, ranks in enumerate(layers):
        r_max = 4 if ranks[-1] == "r_max 4" else None
        k = _case(slots, [r for r in ranks if r != "r_max 4"], seed=i)
        if r_max is not None:
            k["a"], k["b"] = k["a"][:, :r_max], k["b"][:, :, :r_max]
        k["meta"] = meta
        torch.testing.assert_close(_run(k), _loop(monkeypatch, k), rtol=1e-12, atol=1e-12)
    assert len(meta._plans) == len(layers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations_over_float32_adapters(dtype, monkeypatch):
    """x is cast to the adapters' dtype, as PEFT casts it; the result comes back in y's."""
    slots, ranks = CASES["one rank"]
    k = _case(slots, ranks)
    k = {n: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in k.items()}
    k["x"], k["y"] = k["x"].to(dtype), k["y"].to(dtype)
    got = _run(k)
    assert _took(k) and got.dtype == dtype
    assert torch.equal(got, _loop(monkeypatch, k))


def test_ranks_clamped_to_nothing_keep_y_bit_for_bit():
    """A rank beyond the stacks' r_max is clamped; at r_max 0 nothing is added, not even the bias (or +0.0)."""
    k = _case([0, 1, 0, 1], [2, 2], bias=True)
    k["a"], k["b"] = k["a"][:, :0], k["b"][:, :, :0]
    k["y"][0, 0] = -0.0
    assert torch.equal(_run(k).view(torch.int64), k["y"].view(torch.int64))


def test_padding_rows_stay_apart():
    """A bucket's short slots are padded with token 0's row, whose results are dropped: even a NaN there (token 0
    has no adapter) reaches no other token."""
    slots, ranks = [-1, 0, 0, 1, 2, 2, 3], [2, 2, 2, 2]  # widths 2: slots 1 and 3 have one padded row each
    k = _case(slots, ranks)
    k["x"][0] = float("nan")
    got = _run(k)
    assert _took(k) and not got[1:].isnan().any()
    assert torch.equal(got[0], k["y"][0])
    torch.testing.assert_close(got[1:], by_hand(k)[1:], rtol=1e-12, atol=1e-12)


def test_matmuls_per_layer_are_two_per_rank():
    """The claim in numbers: a layer's mixed batch costs two batched matmuls per distinct rank among the adapters
    present, whatever their number, and no per-adapter matmul."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    slots = [s % 16 for s in range(40)]  # 16 adapters of 2 ranks, every one present
    k = _case(slots, [4, 2] * 8)
    with Ops() as ops:
        _run(k)
    assert ops.seen["bmm"] == 4 and not ops.seen["mm"] and not ops.seen["addmm"], dict(ops.seen)
    loop = _case(slots, [4, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17])  # every rank different: the loop
    with Ops() as ops:
        _run(loop)
    assert not ops.seen["bmm"] and ops.seen["mm"] + ops.seen["addmm"] == 32, dict(ops.seen)


def test_a_layer_work_per_bucket_is_its_two_matmuls_and_two_views():
    """Host work is what decode costs on top of reading the weights: once a layer's views of its stacks exist (its
    first batch of a mix), a bucket costs two views of the batch's rows, a transpose and its two matmuls; the deltas
    are written in place (no concatenation), and a batch without padding is not reordered."""
    from torch_ops import TorchOps

    for slots, padded in (([s % 16 for s in range(32)], False), ([s % 16 for s in range(40)], True)):
        k = _case(slots, [4, 2] * 8)
        _run(k)
        with TorchOps() as ops:
            _run(k)
        names = [n.split(".")[1] for n in ops.ops]
        assert "cat" not in names and "slice" not in names and "select" not in names, names
        assert names.count("bmm") == 4 and names.count("as_strided") == 4 and names.count("transpose") == 2, names
        # the x gather and the scalings', and with padding the deltas' reordering
        assert names.count("index_select") == (3 if padded else 2), names


def test_views_follow_the_stacks():
    """The views kept per layer read the stacks' current contents (an adapter written into a slot in place is
    seen), other stacks of the same shapes get their own, and a stack that goes takes its views with it (no
    memory kept alive)."""
    import gc
    import weakref

    for case in ("gathered", "strided"):
        slots, ranks = CASES[case]
        k = _case(slots, ranks, bias=True)
        _run(k)
        k["a"][3, :1] = torch.randn(1, k["a"].shape[2], dtype=torch.float64)  # slot 3 rewritten in place
        k["b"][5, :, :1] *= -3
        k["lb"][1] += 1
        k["scal"][4] = 4.0
        got = _run(k)
        assert _took(k)
        torch.testing.assert_close(got, by_hand(k), rtol=1e-12, atol=1e-12)
    other = {**k, "a": k["a"].clone().mul_(2), "b": k["b"].clone(), "lb": k["lb"].clone()}
    torch.testing.assert_close(_run(other), by_hand(other), rtol=1e-12, atol=1e-12)
    storage = weakref.ref(other["a"].untyped_storage())
    key = id(other["a"])
    assert key in rank_buckets._VIEWS
    del other
    gc.collect()
    assert key not in rank_buckets._VIEWS or rank_buckets._VIEWS[key].stack() is None
    assert storage() is None, "the views kept a dropped stack alive"


def test_a_new_stack_at_a_dead_one_s_address_gets_its_own_views():
    """The views are found by the stacks' ids; an id is reused once its tensor is gone, so a new B stack at the old
    one's address must not get the old one's views (CPython reuses a freed object's memory at once)."""
    slots, ranks = CASES["strided"]
    k = _case(slots, ranks)
    _run(k)
    old_id, fresh = id(k["b"]), k["b"].clone().mul_(-2)
    del k["b"]
    reused = None
    for _ in range(100):
        candidate = fresh.clone()
        if id(candidate) == old_id:
            reused = candidate
            break
        del candidate
    if reused is None:
        pytest.skip("CPython did not reuse the freed tensor's address here")
    k["b"] = reused
    torch.testing.assert_close(_run(k), by_hand(k), rtol=1e-12, atol=1e-12)


def test_batches_of_other_token_counts_over_the_same_stacks():
    """Kept views depend on the buckets' ranks and slots, not on how many tokens each slot has: decode after
    prefill (and back) over one layer's stacks, with and without padding."""
    ranks = [4, 2] * 4
    k = _case(list(range(8)), ranks, bias=True)
    for slots in (list(range(8)), [s for s in range(8) for _ in range(3)], list(range(8)) * 2 + [0, 2],
                  list(range(8))):
        g = torch.Generator().manual_seed(len(slots))
        k = {**k, "x": torch.randn(len(slots), k["x"].shape[1], generator=g, dtype=torch.float64),
             "y": torch.randn(len(slots), k["y"].shape[1], generator=g, dtype=torch.float64),
             "meta": make_lora_batch_meta(torch.tensor(slots), len(ranks))}
        got = _run(k)
        assert _took(k)
        torch.testing.assert_close(got, by_hand(k), rtol=1e-12, atol=1e-12)


def test_views_kept_per_stack_are_bounded():
    """A server cycling through many mixes keeps at most _PLANS_PER_STACK of them per stack (more are rebuilt)."""
    n_slots, r, d = 40, 2, 8
    a, b = torch.randn(n_slots, r, d), torch.randn(n_slots, d, r)
    x = torch.randn(4, d)
    for k in range(3 * rank_buckets._PLANS_PER_STACK):
        s0, s1 = k % n_slots, (k + 1 + k // n_slots) % n_slots
        plan = rank_buckets.bucket_plan([(s0, 0, 2, r), (s1, 2, 2, r)], [0, 1, 2, 3])
        rank_buckets.bucket_deltas(x, a, b, torch.ones(n_slots), None, plan)
        assert len(rank_buckets._VIEWS[id(a)].plans) <= rank_buckets._PLANS_PER_STACK
