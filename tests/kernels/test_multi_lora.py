"""kernels/multi_lora.py: batch metadata, the Triton path against the float64 reference, the reference against PEFT."""
import sys

import pytest
import torch

from peft_fast.kernels import (
    interpreting,
    lora_expand_reference,
    lora_expand_triton,
    lora_shrink_reference,
    lora_shrink_triton,
    make_lora_batch_meta,
    multi_lora,
    multi_lora_reference,
    multi_lora_triton,
)
from switches import use_settings




def _stacks(ranks, in_f, out_f, r_max, *, device, dtype=torch.float64, bias=True):
    """Random adapters, NaN beyond each slot's rank: a kernel that reads the padding returns NaN."""
    n = len(ranks)
    a = torch.randn(n, r_max, in_f, dtype=torch.float64) / in_f**0.5
    b = torch.randn(n, out_f, r_max, dtype=torch.float64) / 4
    lb = torch.randn(n, out_f, dtype=torch.float64) if bias else None
    for s, r in enumerate(ranks):
        a[s, r:] = float("nan")
        b[s, :, r:] = float("nan")
        if r == 0 and lb is not None:
            lb[s] = float("nan")  # a rank-0 slot is an adapter this layer lacks: its bias is never applied either
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device=device)
    scal = (torch.rand(n, dtype=torch.float32) * 2 + 0.1).to(device)
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return conv(a), conv(b), ranks_t, scal, conv(lb)


def _slots(T, n, *, weights=None, seed=0):
    """Unsorted random slots in [-1, n), the same slot repeated many times."""
    g = torch.Generator().manual_seed(seed)
    w = torch.ones(n + 1) if weights is None else torch.tensor(weights, dtype=torch.float)
    return torch.multinomial(w, T, replacement=True, generator=g) - 1


def _assert_close(got, want, tol, what=""):
    assert got.shape == want.shape, what
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max err {err:.3e} vs max |ref| {scale:.3e} (rel tol {tol})"


def _f64(t):
    return None if t is None else t.double()


def _untouched(meta, ranks):
    """Token mask of rows that must keep y bit for bit: slot -1 or a rank-0 slot."""
    slots = meta.token_slots.long()
    rank_of = torch.cat([ranks.long(), ranks.new_zeros(1).long()])  # index -1 -> rank 0
    return rank_of[slots] == 0


def test_meta_hand_made_example():
    meta = make_lora_batch_meta(torch.tensor([2, -1, 0, 2, 2, -1, 0]), 4)
    assert meta.token_slots.dtype == torch.int32 and meta.token_slots.tolist() == [2, -1, 0, 2, 2, -1, 0]
    assert meta.sorted_tokens.tolist() == [2, 6, 0, 3, 4, 1, 5]  # slot 0's, slot 2's, then the base-only tokens
    assert meta.slot_starts.tolist() == [0, 2, 2, 5]
    assert meta.slot_counts.tolist() == [2, 0, 3, 0]
    assert (meta.num_tokens, meta.n_slots, meta.block_m) == (7, 4, 16)
    # One 16-row tile each for slots 0 and 2; the table is as long as any split of 7 tokens over 4 slots needs.
    assert meta.max_tiles == 1 + 4
    assert meta.tile_slots.tolist() == [0, 2, 4, 4, 4] and meta.tile_rows.tolist()[:2] == [0, 0]
    for t in (meta.sorted_tokens, meta.slot_starts, meta.slot_counts, meta.tile_slots, meta.tile_rows):
        assert t.dtype == torch.int32


def test_meta_tiles_cover_every_token_once():
    """Each token of a slot lies in exactly one of its tiles, whatever the split; tiles past the real ones name
    no slot."""
    for T, n, seed in [(300, 3, 0), (64, 64, 1), (5, 1, 2), (1000, 7, 3)]:
        slots = _slots(T, n, seed=seed)
        meta = make_lora_batch_meta(slots, n)
        seen = torch.zeros(T, dtype=torch.long)
        for tile_slot, row in zip(meta.tile_slots.tolist(), meta.tile_rows.tolist()):
            if tile_slot == n:
                continue
            count, start = meta.slot_counts[tile_slot].item(), meta.slot_starts[tile_slot].item()
            assert 0 <= row < count
            rows = meta.sorted_tokens[start + row:start + min(row + meta.block_m, count)].long()
            assert (slots[rows] == tile_slot).all()
            seen[rows] += 1
        assert seen[slots >= 0].eq(1).all() and seen[slots < 0].eq(0).all()


def test_meta_shapes_depend_only_on_the_batch_size():
    """No shape depends on which adapters the batch holds: the same grid and no recompiles for any mix."""
    metas = [make_lora_batch_meta(_slots(40, 6, seed=s), 6) for s in range(5)]
    metas.append(make_lora_batch_meta(torch.full((40,), -1), 6))
    shapes = {tuple(tuple(t.shape) for t in (m.sorted_tokens, m.slot_starts, m.tile_slots, m.tile_rows))
              + (m.block_m,) for m in metas}
    assert len(shapes) == 1, shapes


def test_meta_makes_no_host_sync_without_validation(monkeypatch):
    """Layers build the metadata from slots they made themselves: validate=False reads nothing back."""
    synced = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: synced.append(1) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: synced.append(1))
    make_lora_batch_meta(_slots(33, 5), 5, validate=False)
    assert not synced


def test_meta_edge_cases():
    empty = make_lora_batch_meta(torch.zeros(0, dtype=torch.long), 3)
    assert (empty.num_tokens, empty.sorted_tokens.numel()) == (0, 0)
    assert set(empty.tile_slots.tolist()) <= {3}
    base_only = make_lora_batch_meta([-1, -1], 2)
    assert base_only.slot_counts.tolist() == [0, 0] and set(base_only.tile_slots.tolist()) == {2}
    no_slots = make_lora_batch_meta([-1, -1, -1], 0)
    assert no_slots.slot_counts.numel() == 0 and set(no_slots.tile_slots.tolist()) <= {0}


@pytest.mark.parametrize("bad", [[0, 4], [-2, 1], [5]])
def test_meta_rejects_out_of_range_slots(bad):
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        make_lora_batch_meta(torch.tensor(bad), 4)


def test_meta_rejects_non_integer_slots():
    with pytest.raises(ValueError):
        make_lora_batch_meta(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError):
        make_lora_batch_meta(torch.zeros(2, 2, dtype=torch.long), 4)


CASES = {  # T, in, out, ranks, r_max, slot weights (first: -1), bias
    "odd-mixed-ranks": (37, 45, 29, [1, 8, 13, 64, 0], 64, None, True),
    "decode-splitk": (6, 300, 29, [1, 8, 13, 64, 5, 16], 64, "distinct", False),
    "prefill-few-slots": (150, 45, 70, [8, 64, 13], 64, [1, 6, 1, 1], True),
}


def _case(name, device, dtype=torch.float64, stack_dtype=None, seed=0):
    T, in_f, out_f, ranks, r_max, weights, bias = CASES[name]
    torch.manual_seed(seed)
    a, b, ranks_t, scal, lb = _stacks(ranks, in_f, out_f, r_max, device=device, dtype=stack_dtype or dtype, bias=bias)
    if weights == "distinct":  # decode: one token per sequence, each with its own adapter, in no order
        slots = torch.randperm(len(ranks))[:T]
    else:
        slots = _slots(T, len(ranks), weights=weights, seed=seed)
    meta = make_lora_batch_meta(slots.to(device), len(ranks))
    x = torch.randn(T, in_f, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randn(T, out_f, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, y, a, b, ranks_t, scal, meta, lb


@pytest.mark.triton
@pytest.mark.parametrize("fused", [None, True, False], ids=["auto", "one-launch", "two-launches"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float64(device, name, tol, fused):
    x, y, a, b, ranks, scal, meta, lb = _case(name, device)
    y0 = y.clone()
    got = multi_lora_triton(x, y, a, b, ranks, scal, meta, lb, fused=fused)
    want = multi_lora_reference(x, y, a, b, ranks, scal, meta, lb)
    assert torch.equal(y, y0), "multi_lora mutated y without inplace=True"
    assert not got.isnan().any(), "the zero padding beyond a slot's rank (NaN here) was read"
    _assert_close(got, want, tol[torch.float64], name)
    keep = _untouched(meta, ranks)
    assert keep.any() or name == "decode-splitk"
    assert torch.equal(got[keep], y[keep]), "tokens without an adapter must keep y bit for bit"


@pytest.mark.triton
@pytest.mark.parametrize("fused", [True, False], ids=["one-launch", "two-launches"])
def test_strided_ranks_and_scalings(device, tol, fused):
    """ranks and scalings given as views of every other entry: read by stride, not as contiguous."""
    x, y, a, b, ranks, scal, meta, lb = _case("odd-mixed-ranks", device)
    spread_ranks = torch.stack([ranks, torch.full_like(ranks, 7)], 1).reshape(-1)[::2]
    spread_scal = torch.stack([scal, torch.full_like(scal, 9.0)], 1).reshape(-1)[::2]
    assert not spread_ranks.is_contiguous() and torch.equal(spread_ranks, ranks)
    got = multi_lora_triton(x, y, a, b, spread_ranks, spread_scal, meta, lb, fused=fused)
    _assert_close(got, multi_lora_reference(x, y, a, b, ranks, scal, meta, lb), tol[torch.float64], "strided")


@pytest.mark.triton
@pytest.mark.parametrize("fused", [True, False], ids=["one-launch", "two-launches"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["odd-mixed-ranks", "decode-splitk"])
def test_low_precision_against_float64(device, dtype, name, tol, fused):
    x, y, a, b, ranks, scal, meta, lb = _case(name, device, dtype=dtype, stack_dtype=torch.float32)
    got = multi_lora_triton(x, y, a, b, ranks, scal, meta, lb, fused=fused)
    want = multi_lora_reference(_f64(x), _f64(y), _f64(a), _f64(b), ranks, scal, meta, _f64(lb))
    assert got.dtype == dtype
    _assert_close(got, want, tol[dtype], str(dtype))
    keep = _untouched(meta, ranks)
    assert torch.equal(got[keep], y[keep])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_stacks_against_float64(device, dtype, tol):
    # Adapters stored in the activation dtype: on a GPU both dots run natively on the tensor cores.
    x, y, a, b, ranks, scal, meta, lb = _case("odd-mixed-ranks", device, dtype=dtype)
    got = multi_lora_triton(x, y, a, b, ranks, scal, meta, lb)
    want = multi_lora_reference(_f64(x), _f64(y), _f64(a), _f64(b), ranks, scal, meta, _f64(lb))
    assert got.dtype == dtype and not got.isnan().any()
    _assert_close(got, want, tol[dtype], str(dtype))


@pytest.mark.triton
def test_strided_inputs_and_inplace(device, tol):
    x, y, a, b, ranks, scal, meta, lb = _case("odd-mixed-ranks", device)
    T, in_f = x.shape
    x_rows = torch.zeros(T, 2 * in_f + 3, dtype=x.dtype, device=device)[:, 3:3 + in_f]  # row stride != in
    x_rows.copy_(x)
    x_cols = x.t().contiguous().t()  # column-major
    want = multi_lora_reference(x, y, a, b, ranks, scal, meta, lb)
    for xv in (x_rows, x_cols):
        _assert_close(multi_lora_triton(xv, y, a, b, ranks, scal, meta, lb), want, tol[torch.float64], "strided x")
    y_strided = torch.zeros(y.shape[1], T, dtype=y.dtype, device=device).t()
    y_strided.copy_(y)
    out = multi_lora_triton(x, y_strided, a, b, ranks, scal, meta, lb, inplace=True)
    assert out.data_ptr() == y_strided.data_ptr()
    _assert_close(y_strided, want, tol[torch.float64], "in place into a strided y")


@pytest.mark.triton
def test_inference_only(device, tol):
    x, y, a, b, ranks, scal, meta, lb = _case("odd-mixed-ranks", device)
    a.requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        multi_lora_triton(x, y, a, b, ranks, scal, meta, lb)
    with torch.no_grad():
        got = multi_lora_triton(x, y, a, b, ranks, scal, meta, lb)
    with torch.no_grad():
        _assert_close(got, multi_lora_reference(x, y, a, b, ranks, scal, meta, lb), tol[torch.float64])


@pytest.mark.triton
def test_tensors_on_two_devices_are_an_error():
    x, y, a, b, ranks, scal, meta, lb = _case("odd-mixed-ranks", "cpu")
    with pytest.raises(ValueError, match="one device"):
        multi_lora_triton(x, y, a, b, ranks.to("meta"), scal, meta, lb)


@pytest.mark.triton
def test_dispatch(monkeypatch):
    x, y, a, b, ranks, scal, meta, lb = _case("odd-mixed-ranks", "cpu")
    want = multi_lora_reference(x, y, a, b, ranks, scal, meta, lb)
    use_settings(monkeypatch, backend="torch")
    assert torch.equal(multi_lora(x, y, a, b, ranks, scal, meta, lb), want)
    if interpreting():
        use_settings(monkeypatch, backend="triton")
        got = multi_lora(x, y, a, b, ranks, scal, meta, lb)
        assert torch.equal(got, multi_lora_triton(x, y, a, b, ranks, scal, meta, lb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_peft_bit_for_bit(dtype):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 20)).to(dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=12, lora_bias=True),
                                adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(target_modules=["0"], r=7, lora_alpha=5, lora_bias=True))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name in ("one", "two"):
            layer.lora_B[name].weight.normal_()
            layer.lora_B[name].bias.normal_()
    model.eval()
    x = torch.randn(5, 3, 24, dtype=dtype)
    names = ["two", "__base__", "one", "two", "one"]
    with torch.no_grad():
        want = model(x, adapter_names=names)
        r_max, ranks = 7, [4, 7]
        a_stack = torch.zeros(2, r_max, 24)
        b_stack = torch.zeros(2, 20, r_max)
        for s, (name, r) in enumerate(zip(("one", "two"), ranks)):
            a_stack[s, :r] = layer.lora_A[name].weight
            b_stack[s, :, :r] = layer.lora_B[name].weight
        bias_stack = torch.stack([layer.lora_B[n].bias for n in ("one", "two")])
        scal = torch.tensor([layer.scaling[n] for n in ("one", "two")], dtype=torch.float32)
        slot_of = {"one": 0, "two": 1, "__base__": -1}
        meta = make_lora_batch_meta(torch.tensor([slot_of[n] for n in names]).repeat_interleave(3), 2)
        base = layer.base_layer(x).reshape(15, 20)
        got = multi_lora_reference(x.reshape(15, 24), base, a_stack, b_stack, torch.tensor(ranks), scal, meta,
                                   bias_stack)
    assert a_stack.dtype == torch.float32 and got.dtype == want.dtype
    assert torch.equal(got.reshape(5, 3, 20), want)


@pytest.mark.triton
def test_one_launch_only_for_small_slots(monkeypatch):
    """Decode batches take the one-launch kernel unless a slot's A (re-read by every out tile) is over
    DECODE_MAX_A_BYTES, as for a single adapter's decode; larger batches always take two launches."""
    from peft_fast.kernels.common.lora_decode import DECODE_MAX_A_BYTES

    module = sys.modules["peft_fast.kernels.multi_lora"]
    calls = []
    monkeypatch.setattr(module, "_fused", lambda *a: calls.append("one") or a[1])
    monkeypatch.setattr(module, "lora_shrink_triton", lambda *a, **k: calls.append("two"))
    monkeypatch.setattr(module, "lora_expand_triton", lambda y, *a, **k: y)

    def path(T, r_max, in_f, dtype=torch.float32):
        calls.clear()
        n = 3
        a = torch.zeros(n, r_max, in_f, dtype=dtype)
        multi_lora_triton(torch.zeros(T, in_f, dtype=dtype), torch.zeros(T, 5, dtype=dtype), a,
                          torch.zeros(n, 5, r_max, dtype=dtype), torch.ones(n, dtype=torch.int32), torch.ones(n),
                          make_lora_batch_meta(torch.arange(T) % n, n))
        return calls[0]

    fits = DECODE_MAX_A_BYTES // (16 * 4)  # in_features of a 16-rank fp32 slot exactly at the bound
    assert path(16, 16, fits) == "one"
    assert path(16, 16, fits + 1) == "two"
    assert path(16, 16, fits + 1, torch.bfloat16) == "one"  # bytes, not elements
    assert path(17, 16, 8) == "two"


# ---------------------------------------------------------------------------- a slot's rank above the stacks' r_max
def _rank_above_r_max(device, seed=0):
    """Stacks of r_max 5 with a slot whose rank (8) exceeds it: every path clamps the rank to r_max, as the
    references do (min(rank, r_max)). At the suite's usual r_max of 64 a missing clamp changes nothing."""
    g = torch.Generator().manual_seed(seed)
    tokens, in_f, out_f, r_max, ranks = 23, 24, 19, 5, [8, 3, 5, 0]
    n = len(ranks)
    kw = dict(dtype=torch.float64, generator=g)
    a = torch.randn(n, r_max, in_f, **kw) / in_f**0.5
    b = torch.randn(n, out_f, r_max, **kw)
    x, y = torch.randn(tokens, in_f, **kw), torch.randn(tokens, out_f, **kw)
    slots = torch.randint(-1, n, (tokens,), generator=g)
    slots[:3] = 0  # the over-ranked slot surely has tokens
    meta = make_lora_batch_meta(slots.to(device), n)
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device=device)
    scal = torch.rand(n, dtype=torch.float64, generator=g).to(device) + 0.5
    return [t.to(device) for t in (x, y, a, b)] + [ranks_t, scal, meta]


@pytest.mark.triton
def test_a_rank_above_r_max_is_clamped(device):
    x, y, a, b, ranks, scal, meta = _rank_above_r_max(device)
    opts = dict(rtol=1e-10, atol=1e-10)
    for split_k in (None, 1, 2):
        torch.testing.assert_close(lora_shrink_triton(x, a, ranks, meta, split_k=split_k),
                                   lora_shrink_reference(x, a, ranks, meta), **opts, msg=f"split_k={split_k}")
    z = lora_shrink_reference(x, a, ranks, meta)
    torch.testing.assert_close(lora_expand_triton(y.clone(), z, b, ranks, scal, meta),
                               lora_expand_reference(y.clone(), z, b, ranks, scal, meta), **opts)
    want = multi_lora_reference(x, y, a, b, ranks, scal, meta)
    for fused in (True, False):
        torch.testing.assert_close(multi_lora_triton(x, y, a, b, ranks, scal, meta, fused=fused), want, **opts,
                                   msg=f"fused={fused}")
