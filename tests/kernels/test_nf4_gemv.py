"""kernels/nf4_gemv.py: the decode-size NF4 matmul that reads the codes once, against bitsandbytes' semantics
(dequantize in float32, cast to x's dtype, matmul), and its use inside nf4_linear / qlora_linear when selected."""
import importlib

import pytest
import torch

from peft_fast.kernels import (
    NF4State,
    nf4_gemv,
    nf4_gemv_reference,
    nf4_gemv_triton,
    nf4_linear_reference,
    nf4_linear_triton,
    nf4_quantize,
    qlora_linear_reference,
    qlora_linear_triton,
)
from switches import use_settings

# rows, out, in, double quant, quant type, blocksize: odd sizes whose blocks span rows, as bitsandbytes allows
CASES = [(1, 37, 45, True, "nf4", 64), (3, 130, 96, False, "fp4", 32), (16, 19, 256, True, "nf4", 128),
         (5, 64, 64, False, "nf4", 64)]


def _case(rows, out_f, in_f, nested, qt, bs, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    packed, state = nf4_quantize(w.to(device), blocksize=bs, compress_statistics=nested, quant_type=qt)
    x = torch.randn(rows, in_f, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(out_f, generator=g).to(device=device, dtype=dtype)
    return x, packed, state, b


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-{c[4]}-bs{c[5]}")
def test_matches_the_dequantize_then_matmul_reference(device, dtype, case, tol):
    x, packed, state, b = _case(*case, device, dtype)
    for bias in (b, None):
        got = nf4_gemv_triton(x, packed, state, bias)
        want = nf4_gemv_reference(x, packed, state, bias)
        assert got.dtype == dtype and got.shape == want.shape
        # The semantics both approximate: the weight dequantized and rounded to x's dtype, then exact math (a 16-bit
        # reference rounds its own way, so both are held to it rather than to each other).
        w = nf4_gemv_reference(torch.eye(x.shape[1], device=device, dtype=dtype), packed, state, None).double().t()
        exact = x.double() @ w.t() + (bias.double() if bias is not None else 0)
        scale = exact.abs().max().item()
        for name, y in (("triton", got), ("reference", want)):
            err = (y.double() - exact).abs().max().item()
            assert err <= tol[dtype] * scale, (name, err, scale)


@pytest.mark.triton
def test_strided_leading_dims_and_dispatch(device, monkeypatch):
    x, packed, state, b = _case(1, 24, 128, True, "nf4", 64, device, torch.float32)
    xs = torch.randn(2, 128, 3, device=device).transpose(1, 2)[:, :2]  # [2, 2, 128], not contiguous
    want = nf4_gemv_reference(xs, packed, state, b)
    torch.testing.assert_close(nf4_gemv_triton(xs, packed, state, b), want, rtol=1e-5, atol=1e-5)
    use_settings(monkeypatch, backend="torch")
    assert torch.equal(nf4_gemv(xs, packed, state, b), want)


@pytest.mark.triton
def test_refuses_prefill_sizes_and_gradients(device):
    x, packed, state, b = _case(17, 8, 64, False, "nf4", 64, device, torch.float32)
    with pytest.raises(ValueError, match="at most 16 rows"):
        nf4_gemv_triton(x, packed, state, b)
    with pytest.raises(RuntimeError, match="no backward"):
        nf4_gemv_triton(x[:2].requires_grad_(), packed, state, b)


@pytest.mark.triton
@pytest.mark.parametrize("rows", [1, 16, 17])
def test_nf4_linear_and_qlora_linear_use_it_when_selected(device, monkeypatch, rows):
    """PEFT_FAST_NF4_DECODE=gemv: decode-size forwards run the GEMV (prefill sizes keep dequantize + cuBLAS), with
    the same outputs and gradients as the references."""
    gemv_mod = importlib.import_module("peft_fast.kernels.nf4_gemv")
    linear_mod = importlib.import_module("peft_fast.kernels.nf4_linear")
    calls = []
    real = gemv_mod.gemv_raw
    monkeypatch.setattr(linear_mod, "gemv_raw", lambda *a, **k: calls.append(1) or real(*a, **k))
    use_settings(monkeypatch, nf4_decode="gemv")
    x, packed, state, b = _case(rows, 40, 64, True, "nf4", 64, device, torch.float64)
    x.requires_grad_()
    y = nf4_linear_triton(x, packed, state, b)
    want = nf4_linear_reference(x, packed, state, b)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    g, wg = (torch.autograd.grad(t.sum(), x)[0] for t in (y, want))
    torch.testing.assert_close(g, wg, rtol=1e-10, atol=1e-10)
    a = torch.randn(4, 64, dtype=torch.float64, device=device) / 8
    bb = torch.randn(40, 4, dtype=torch.float64, device=device) / 8
    yq = qlora_linear_triton(x.detach(), packed, state, b, a, bb, 0.5, 0.0)
    wq = qlora_linear_reference(x.detach(), packed, state, b, a, bb, 0.5, 0.0)
    torch.testing.assert_close(yq, wq, rtol=1e-10, atol=1e-10)
    assert len(calls) == (2 if rows <= 16 else 0)


@pytest.mark.triton
def test_the_weight_is_rounded_to_x_dtype(device):
    """bitsandbytes dequantizes to x's dtype, then multiplies: two weights one bf16 ulp apart in float32 are equal
    there. x = e0 - e64 over such a pair gives exactly 0, as the reference does."""
    n_in = 128
    q = torch.full((n_in,), 7, dtype=torch.uint8)  # code 7 is 0.0
    q[0] = q[64] = 15  # code 15 is 1.0
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1).to(device)
    absmax = torch.tensor([1.0, 1.0 + 2.0**-12], dtype=torch.float32, device=device)  # equal in bf16
    state = NF4State(absmax, torch.Size((1, n_in)), torch.bfloat16, 64, "nf4")
    x = torch.zeros(2, n_in, dtype=torch.bfloat16, device=device)
    x[:, 0], x[:, 64] = 1.0, -1.0
    want = nf4_gemv_reference(x, packed, state, None)
    assert torch.equal(want, torch.zeros_like(want))
    assert torch.equal(nf4_gemv_triton(x, packed, state, None), want)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_double_quant_over_several_nested_blocks(device, dtype, tol):
    """64 x 512 at blocksize 64: 512 absmax values in two 256-blocks of double quantization, of different scales
    (the other cases fit one)."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 512, generator=g) / 512**0.5
    w[32:] *= 8
    packed, state = nf4_quantize(w.to(device), blocksize=64, compress_statistics=True)
    assert state.nested and state.nested_absmax.numel() == 2
    x = torch.randn(3, 512, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(64, generator=g).to(device=device, dtype=dtype)
    want = nf4_gemv_reference(x, packed, state, b)
    err = (nf4_gemv_triton(x, packed, state, b).double() - want.double()).abs().max().item()
    assert err <= 10 * tol[dtype] * want.abs().max().item(), err
