"""kernels/lora_shrink.py: z = x·A_sᵀ per token of slot s, against the float64 reference."""
import pytest
import torch

from peft_fast.kernels import (
    interpreting,
    lora_shrink,
    lora_shrink_reference,
    lora_shrink_triton,
    make_lora_batch_meta,
)
from peft_fast.kernels.common.batch_meta import block_m as _block_m
from peft_fast.kernels.lora_shrink import _shrink_blocks, _split_k
from switches import use_settings


RANKS = [1, 8, 13, 64, 0]


def _problem(T, in_f, ranks, r_max, *, device, dtype=torch.float64, a_dtype=None, slots=None, seed=0):
    """x, a_stack poisoned with NaN beyond each slot's rank, ranks, meta over unsorted slots including -1."""
    g = torch.Generator().manual_seed(seed)
    n = len(ranks)
    a = torch.randn(n, r_max, in_f, dtype=torch.float64, generator=g) / in_f**0.5
    for s, r in enumerate(ranks):
        a[s, r:] = float("nan")
    if slots is None:
        slots = torch.randint(-1, n, (T,), generator=g)
    x = torch.randn(T, in_f, dtype=torch.float64, generator=g).to(device=device, dtype=dtype)
    meta = make_lora_batch_meta(slots.to(device), n)
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device=device)
    return x, a.to(device=device, dtype=a_dtype or dtype), ranks_t, meta


def _assert_close(got, want, tol, what=""):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max err {err:.3e} vs max |ref| {scale:.3e} (rel tol {tol})"


def _check_zeros(z, meta, ranks):
    """Rows without an adapter, and columns at or beyond the slot's rank, are exactly zero."""
    slots = meta.token_slots.long()
    rank_of = torch.cat([ranks.long(), ranks.new_zeros(1).long()])[slots]  # slot -1 -> rank 0
    beyond = torch.arange(z.shape[1], device=z.device)[None, :] >= rank_of[:, None]
    assert torch.equal(z[beyond], torch.zeros_like(z[beyond]))


@pytest.mark.triton
@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize("T,in_f", [(37, 45), (6, 300), (150, 130)], ids=["odd", "decode", "prefill"])
def test_matches_reference_float64(device, T, in_f, split_k, tol):
    x, a, ranks, meta = _problem(T, in_f, RANKS, 64, device=device)
    z = lora_shrink_triton(x, a, ranks, meta, split_k=split_k)
    want = lora_shrink_reference(x, a, ranks, meta)
    assert z.dtype == torch.float64 and not z.isnan().any(), "the padding beyond a slot's rank was read"
    _assert_close(z, want, tol[torch.float64])
    _check_zeros(z, meta, ranks)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_float64(device, dtype, tol):
    x, a, ranks, meta = _problem(37, 45, RANKS, 64, device=device, dtype=dtype, a_dtype=torch.float32)
    z = lora_shrink_triton(x, a, ranks, meta)
    want = lora_shrink_reference(x.double(), a.double(), ranks, meta)
    assert z.dtype == torch.float32
    _assert_close(z.double(), want, tol[dtype], str(dtype))
    _check_zeros(z, meta, ranks)


@pytest.mark.triton
def test_strided_operands(device, tol):
    x, a, ranks, meta = _problem(37, 45, RANKS, 64, device=device)
    want = lora_shrink_reference(x, a, ranks, meta)
    x_strided = torch.zeros(37, 100, dtype=x.dtype, device=device)[:, 7:52]
    x_strided.copy_(x)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)  # stored [n, in, r], as a fan-in-first checkpoint would be
    _assert_close(lora_shrink_triton(x_strided, a_t, ranks, meta), want, tol[torch.float64])


def test_tiles_and_split_policy():
    z = torch.zeros(1)
    # Decode: one token per slot -> one token tile per slot, split-K to fill the SMs.
    bm, (br, bk) = _block_m(1), _shrink_blocks(64, 4096)
    assert (bm, br, bk) == (16, 32, 64)
    assert _split_k(6 * 2, 4096, bk, z) > 1
    # The test's decode shape splits as well (the interpreter counts as a small GPU).
    assert _split_k(6 * 2, 300, _shrink_blocks(64, 300)[1], z) > 1
    # Prefill: many tiles already, plain stores.
    assert _block_m(2000) == 64 and _split_k(32 * 2 * 4, 4096, bk, z) == 1
    # A slot of at most half the largest rank pays for at most half of the rank tiles.
    assert _shrink_blocks(16, 64)[0] == 16 and _shrink_blocks(128, 64)[0] == 64 and _shrink_blocks(512, 64)[0] == 64


def test_no_split_in_deterministic_mode():
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert _split_k(1, 4096, 64, torch.zeros(1)) == 1
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.triton
def test_nothing_to_do(device):
    x, a, ranks, meta = _problem(5, 45, RANKS, 64, device=device, slots=torch.tensor([-1, 4, -1, 4, 4]))
    z = lora_shrink_triton(x, a, ranks, meta)  # only a rank-0 slot has tokens: its programs all leave at once
    assert torch.equal(z, torch.zeros_like(z))


@pytest.mark.triton
def test_dispatch(monkeypatch, tol):
    x, a, ranks, meta = _problem(37, 45, RANKS, 64, device="cpu")
    want = lora_shrink_reference(x, a, ranks, meta)
    use_settings(monkeypatch, backend="torch")
    assert torch.equal(lora_shrink(x, a, ranks, meta), want)
    if interpreting():
        use_settings(monkeypatch, backend="triton")
        _assert_close(lora_shrink(x, a, ranks, meta), want, tol[torch.float64])
