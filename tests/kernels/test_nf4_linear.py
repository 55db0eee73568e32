"""kernels/nf4_linear.py: the 4-bit base-only linear (NF4Linear's op), Triton vs the reference."""
import pytest
import torch

from peft_fast.kernels import nf4_linear, nf4_linear_reference, nf4_linear_triton, nf4_quantize
from switches import use_settings



def _case(lead, out_f, in_f, device, dtype, nested, quant_type="nf4", blocksize=64):
    w = torch.randn(out_f, in_f, device=device) / in_f**0.5
    packed, state = nf4_quantize(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    x = torch.randn(*lead, in_f, device=device, dtype=dtype).requires_grad_()
    b = torch.randn(out_f, device=device, dtype=dtype).requires_grad_()
    return x, packed, state, b


def _close(got, want, tol):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * want.double().abs().max().item(), err


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,out_f,in_f,nested,qt,bs", [((3, 5), 37, 128, True, "nf4", 64),
                                                         ((70,), 19, 96, False, "fp4", 32),
                                                         ((1,), 130, 256, True, "nf4", 128),
                                                         ((4,), 1, 45, True, "nf4", 64)])  # odd codes: a pad nibble
def test_forward_backward_match_reference(device, dtype, lead, out_f, in_f, nested, qt, bs, tol):
    x, packed, state, b = _case(lead, out_f, in_f, device, dtype, nested, qt, bs)
    y = nf4_linear_triton(x, packed, state, b)
    x64, b64 = (t.detach().double().requires_grad_() for t in (x, b))
    want = nf4_linear_reference(x64, packed, state, b64)
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    _close(y, want, tol[dtype])
    dy = torch.randn(y.shape, dtype=torch.float64, device=device).to(dtype)
    gx, gb = torch.autograd.grad(y, (x, b), dy)
    wx, wb = torch.autograd.grad(want, (x64, b64), dy.double())  # the same dy: a one-output bias sums few values
    _close(gx, wx, tol[dtype])
    _close(gb, wb, tol[dtype])


@pytest.mark.triton
def test_strided_input_and_dispatch(device, monkeypatch):
    x, packed, state, b = _case((4,), 24, 128, device, torch.float32, True)
    xs = torch.randn(128, 4, device=device).t()  # non-contiguous
    _close(nf4_linear_triton(xs, packed, state, b), nf4_linear_reference(xs, packed, state, b), 1e-5)
    use_settings(monkeypatch, backend="torch")
    assert torch.equal(nf4_linear(xs, packed, state, b), nf4_linear_reference(xs, packed, state, b))


def test_errors():
    x, packed, state, b = _case((2,), 8, 64, "cpu", torch.float32, False)
    with pytest.raises(ValueError, match="x has 32 features"):
        nf4_linear_reference(torch.randn(2, 32), packed, state, b)
    with pytest.raises(ValueError, match="packed codes must be uint8"):
        nf4_linear_reference(x, packed.to(torch.int32), state, b)
