"""kernels/nf4_gemv.py: the decode-size 4-bit GEMV, Triton vs the reference."""
import pytest
import torch

from peft_fast.kernels import HAS_TRITON, interpreting, nf4_quantize
from peft_fast.kernels.nf4_gemv import nf4_gemv, nf4_gemv_reference, nf4_gemv_triton

DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])
needs_triton = pytest.mark.skipif(not HAS_TRITON or not DEVICES, reason="no Triton, or no device it can run on")
TOL = {torch.float64: 1e-5, torch.float32: 1e-5,  # float32 accumulation by design
       torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _close(got, want, tol):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * want.double().abs().max().item(), err


@needs_triton
@pytest.mark.parametrize("device", DEVICES or ["cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,out_f,in_f,bs,nested,qt,bias", [(1, 37, 128, 64, True, "nf4", True),
                                                               (3, 130, 96, 32, False, "fp4", False),
                                                               (16, 9, 1024, 256, True, "nf4", True),
                                                               (2, 77, 640, 128, False, "nf4", True)])
def test_matches_reference(device, dtype, rows, out_f, in_f, bs, nested, qt, bias):
    w = torch.randn(out_f, in_f, device=device) / in_f**0.5
    packed, state = nf4_quantize(w, blocksize=bs, compress_statistics=nested, quant_type=qt)
    x = torch.randn(rows, in_f, device=device, dtype=dtype)
    b = torch.randn(out_f, device=device, dtype=dtype) if bias else None
    got = nf4_gemv_triton(x, packed, state, b)
    want = nf4_gemv_reference(x.double(), packed, state, b.double() if bias else None)
    assert got.dtype == dtype and got.shape == (rows, out_f)
    _close(got, want, TOL[dtype])


@needs_triton
def test_strides_3d_dispatch_and_errors(monkeypatch):
    device = DEVICES[0]
    packed, state = nf4_quantize(torch.randn(24, 128, device=device), compress_statistics=True)
    x = torch.randn(2, 128, 3, device=device).transpose(1, 2)  # [2, 3, 128], non-contiguous
    _close(nf4_gemv_triton(x, packed, state, None), nf4_gemv_reference(x, packed, state, None), 1e-5)
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    assert torch.equal(nf4_gemv(x, packed, state, None), nf4_gemv_reference(x, packed, state, None))
    odd, ostate = nf4_quantize(torch.randn(4, 96, device=device))
    with pytest.raises(ValueError, match="multiple of the 4-bit blocksize"):
        nf4_gemv_triton(torch.randn(1, 96, device=device), odd, ostate, None)
