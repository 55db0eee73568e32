"""kernels/lora_expand.py: y[t] += s·(z[t]·B_sᵀ + bias_s) in place, against the float64 reference."""
import pytest
import torch

from peft_fast.kernels import (
    interpreting,
    lora_expand,
    lora_expand_reference,
    lora_expand_triton,
    make_lora_batch_meta,
)
from switches import use_settings


RANKS = [1, 8, 13, 64, 0]


def _problem(T, out_f, ranks, r_max, *, device, dtype=torch.float64, b_dtype=None, bias=True, seed=0):
    """y, z, b_stack and bias; NaN wherever the expand must not look: z and B beyond each slot's rank, z rows of
    tokens without an adapter, and the whole of a rank-0 slot, bias included."""
    g = torch.Generator().manual_seed(seed)
    n = len(ranks)
    b = torch.randn(n, out_f, r_max, dtype=torch.float64, generator=g) / 4
    lb = torch.randn(n, out_f, dtype=torch.float64, generator=g) if bias else None
    slots = torch.randint(-1, n, (T,), generator=g)
    z = torch.randn(T, r_max, dtype=torch.float64, generator=g)
    for s, r in enumerate(ranks):
        b[s, :, r:] = float("nan")
        z[slots == s, r:] = float("nan")
        if r == 0 and lb is not None:
            lb[s] = float("nan")
    z[slots == -1] = float("nan")
    y = torch.randn(T, out_f, dtype=torch.float64, generator=g).to(device=device, dtype=dtype)
    scal = (torch.rand(n, generator=g) * 2 + 0.1).to(device)
    meta = make_lora_batch_meta(slots.to(device), n)
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device=device)
    z = z.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    conv = lambda t: None if t is None else t.to(device=device, dtype=b_dtype or dtype)  # noqa: E731
    return y, z, conv(b), ranks_t, scal, meta, conv(lb)


def _assert_close(got, want, tol, what=""):
    assert got.shape == want.shape, what
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max err {err:.3e} vs max |ref| {scale:.3e} (rel tol {tol})"


def _untouched(meta, ranks):
    rank_of = torch.cat([ranks.long(), ranks.new_zeros(1).long()])
    return rank_of[meta.token_slots.long()] == 0


@pytest.mark.triton
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T,out_f", [(37, 29), (6, 300), (150, 70)], ids=["odd", "decode", "prefill"])
def test_matches_reference_float64_in_place(device, T, out_f, bias, tol):
    y, z, b, ranks, scal, meta, lb = _problem(T, out_f, RANKS, 64, device=device, bias=bias)
    y0 = y.clone()
    want = lora_expand_reference(y0.clone(), z, b, ranks, scal, meta, lb)
    got = lora_expand_triton(y, z, b, ranks, scal, meta, lb)
    assert got is y, "lora_expand adds into y and returns it"
    assert not got.isnan().any(), "read something outside the slots' ranks or a rank-0 slot"
    _assert_close(got, want, tol[torch.float64])
    keep = _untouched(meta, ranks)
    assert torch.equal(got[keep], y0[keep])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_float64(device, dtype, tol):
    y, z, b, ranks, scal, meta, lb = _problem(37, 29, RANKS, 64, device=device, dtype=dtype, b_dtype=torch.float32)
    y0 = y.clone()
    want = lora_expand_reference(y.double(), z.double(), b.double(), ranks, scal, meta, lb.double())
    got = lora_expand_triton(y, z, b, ranks, scal, meta, lb)
    assert got.dtype == dtype
    _assert_close(got, want, tol[dtype], str(dtype))
    keep = _untouched(meta, ranks)
    assert torch.equal(got[keep], y0[keep])


@pytest.mark.triton
def test_strided_operands(device, tol):
    y, z, b, ranks, scal, meta, lb = _problem(37, 29, RANKS, 64, device=device)
    want = lora_expand_reference(y.clone(), z, b, ranks, scal, meta, lb)
    y_t = y.t().contiguous().t()  # column-major y, written in place through its strides
    b_t = b.transpose(1, 2).contiguous().transpose(1, 2)
    z_wide = torch.zeros(37, 80, dtype=z.dtype, device=device)[:, 5:69]
    z_wide.copy_(z)
    lora_expand_triton(y_t, z_wide, b_t, ranks, scal, meta, lb)
    _assert_close(y_t, want, tol[torch.float64])


@pytest.mark.triton
def test_dispatch(monkeypatch, tol):
    y, z, b, ranks, scal, meta, lb = _problem(37, 29, RANKS, 64, device="cpu")
    want = lora_expand_reference(y.clone(), z, b, ranks, scal, meta, lb)
    use_settings(monkeypatch, backend="torch")
    assert torch.equal(lora_expand(y.clone(), z, b, ranks, scal, meta, lb), want)
    if interpreting():
        use_settings(monkeypatch, backend="triton")
        _assert_close(lora_expand(y.clone(), z, b, ranks, scal, meta, lb), want, tol[torch.float64])


def test_shape_errors():
    y, z, b, ranks, scal, meta, lb = _problem(7, 9, [2, 3], 4, device="cpu")
    with pytest.raises(ValueError):
        lora_expand_reference(y, z[:, :3], b, ranks, scal, meta, lb)
    with pytest.raises(ValueError):
        lora_expand_reference(y, z, b, ranks, scal, meta, lb[:, :5])
    with pytest.raises(ValueError):
        lora_expand_reference(y[:6], z, b, ranks, scal, meta, lb)
