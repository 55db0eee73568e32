"""kernels/qlora_gemv.py: the fused NF4 decode GEMV (+ LoRA epilogue) vs qlora_linear's reference."""
import dataclasses

import pytest
import torch

from peft_fast.kernels import HAS_TRITON, interpreting, nf4_quantize
from peft_fast.kernels import qlora_gemv as gemv_mod
from peft_fast.kernels.qlora_gemv import qlora_gemv, qlora_gemv_reference, qlora_gemv_triton

DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])
needs_triton = pytest.mark.skipif(not HAS_TRITON or not DEVICES, reason="no Triton, or no device it can run on")
device_params = pytest.mark.parametrize("device", DEVICES or ["cpu"])

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _weight(out_f, in_f, device, blocksize=64, nested=False, quant_type="nf4"):
    w = torch.randn(out_f, in_f, device=device) / in_f**0.5
    return nf4_quantize(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def _inputs(lead, in_f, out_f, r, *, device, dtype, adapter_dtype=None, bias=True, lora_bias=True):
    """Random everything (B and the LoRA bias too), so that each term of the output is checked."""
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, in_f, dtype=dtype, device=device)
    b = torch.randn(out_f, dtype=dtype, device=device) if bias else None
    a = torch.randn(r, in_f, dtype=adapter_dtype, device=device) / in_f**0.5
    bb = torch.randn(out_f, r, dtype=adapter_dtype, device=device) / r**0.5
    lb = torch.randn(out_f, dtype=adapter_dtype, device=device) if lora_bias else None
    return x, b, a, bb, lb


def _f64(t):
    return None if t is None else t.double()


def _assert_close(got, want, tol, what=""):
    assert got.shape == want.shape, what
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max err {err:.3e} vs max |ref| {scale:.3e} (rel tol {tol})"


def _compare(packed, state, inputs, scaling, tol):
    """Triton in the inputs' dtypes vs the reference in float64 on the same 4-bit weight."""
    x, b, a, bb, lb = inputs
    got = qlora_gemv_triton(x, packed, state, b, a, bb, scaling, lb)
    want = qlora_gemv_reference(_f64(x), packed, state, _f64(b), _f64(a), _f64(bb), scaling, _f64(lb))
    assert got.dtype == x.dtype
    _assert_close(got, want, tol, "forward")
    return got


# (lead, out, r): M = 1, 3, 16 and 17 (a second M tile); out = 37 (tiles of 4 under the interpreter, masked),
# 130 (tiles of 16, masked), 5 (tiles of 1).
SHAPES = [((1,), 37, 5), ((3,), 130, 8), ((16,), 37, 16), ((17,), 5, 3)]


@needs_triton
@device_params
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0][0]}-out{s[1]}-r{s[2]}")
def test_float64_matches_reference(device, shape, blocksize, nested):
    lead, out_f, r = shape
    in_f = blocksize * (3 if out_f != 130 else 5)  # odd multiples: the last K step is partly masked
    packed, state = _weight(out_f, in_f, device, blocksize, nested)
    _compare(packed, state, _inputs(lead, in_f, out_f, r, device=device, dtype=torch.float64), 0.37,
             TOL[torch.float64])


@needs_triton
@device_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocksize", [256, 1024, 4096])
def test_large_blocksizes(device, blocksize, dtype):
    """Blocks longer than a K step: several steps share one absmax (and 4096 exceeds any step). float32 takes
    the kernel's scale-after-the-sum path, float64 the reference's per-element rounding: both are checked."""
    packed, state = _weight(37, blocksize, device, blocksize, nested=True)
    _compare(packed, state, _inputs((2,), blocksize, 37, 4, device=device, dtype=dtype), 0.8, TOL[dtype])


@needs_triton
@device_params
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_fp4(device, blocksize, nested):
    packed, state = _weight(29, blocksize * 3, device, blocksize, nested, "fp4")
    assert state.quant_type == "fp4"
    _compare(packed, state, _inputs((3,), blocksize * 3, 29, 4, device=device, dtype=torch.float64), 0.5,
             TOL[torch.float64])


@needs_triton
@device_params
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_optional_biases(device, bias, lora_bias):
    packed, state = _weight(37, 192, device)
    inputs = _inputs((3,), 192, 37, 6, device=device, dtype=torch.float64, bias=bias, lora_bias=lora_bias)
    _compare(packed, state, inputs, 1.5, TOL[torch.float64])


@needs_triton
@device_params
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("lead", [(1,), (4,)])
def test_float32(device, lead, blocksize, nested):
    packed, state = _weight(45, blocksize * 5, device, blocksize, nested)
    _compare(packed, state, _inputs(lead, blocksize * 5, 45, 8, device=device, dtype=torch.float32), 0.25,
             TOL[torch.float32])


@needs_triton
@device_params
@pytest.mark.parametrize("adapter_dtype", ["fp32", "same"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_float64(device, dtype, adapter_dtype):
    adapter = torch.float32 if adapter_dtype == "fp32" else dtype
    packed, state = _weight(37, 192, device, 64, nested=True)
    inputs = _inputs((3,), 192, 37, 5, device=device, dtype=dtype, adapter_dtype=adapter)
    _compare(packed, state, inputs, 2.0, TOL[dtype])


@needs_triton
@device_params
def test_non_contiguous_and_3d_x(device):
    K = 64 * 13  # several K steps (tiles of 16 rows x 128 bytes under the interpreter), the last one masked
    packed, state = _weight(130, K, device)
    _, b, a, bb, lb = _inputs((1,), K, 130, 4, device=device, dtype=torch.float64)
    rows = torch.randn(5, 2 * K, dtype=torch.float64, device=device)[:, ::2]  # element stride 2
    cols = torch.randn(K + 9, 3, dtype=torch.float64, device=device)[:K].t()  # row stride 1, element stride 3
    batch = torch.randn(3, 2, K, dtype=torch.float64, device=device).transpose(0, 1)  # [2, 3, K], permuted
    for x in (rows, cols, batch, torch.randn(2, 3, K, dtype=torch.float64, device=device)):
        assert x.dim() == 3 or not x.is_contiguous()
        got = _compare(packed, state, (x, b, a, bb, lb), 0.5, TOL[torch.float64])
        assert got.shape == (*x.shape[:-1], 130)
    # column-major adapters (strided views, as a transposed or sliced parameter would be)
    a_cm, bb_cm = a.t().contiguous().t(), bb.t().contiguous().t()
    assert a_cm.stride(0) == 1 and bb_cm.stride(0) == 1 and torch.equal(bb_cm, bb)
    _compare(packed, state, (rows, b, a_cm, bb_cm, lb), 0.5, TOL[torch.float64])


@needs_triton
@device_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_tiling_under_any_device(device, dtype, monkeypatch):
    """With an H100's 132 SMs the heuristic picks 1-row tiles and 2 KiB steps: run those tiles here too."""
    monkeypatch.setattr(gemv_mod, "_num_sms", lambda _device: 132)
    assert gemv_mod._gemv_blocks(1, 37, 4096, 64, 132)[1:3] == (1, 2048)
    packed, state = _weight(37, 4096, device, 64, nested=True)
    _compare(packed, state, _inputs((1,), 4096, 37, 8, device=device, dtype=dtype), 0.5, TOL[dtype])


@pytest.mark.skipif(not HAS_TRITON, reason="no Triton")
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("out_in", [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)])
def test_hopper_tiling_heuristic(out_in, M):
    """Llama-8B layers on 132 SMs: ≥ 4 programs per SM, ≤ 2 KiB of weight bytes per program step, and a step
    made of whole runs that never cross an absmax block."""
    N, K = out_in
    for blocksize in (64, 128):
        bm, bn, bkb, inner, warps = gemv_mod._gemv_blocks(M, N, K, blocksize, 132)
        assert bm == M and warps == 4
        assert (N + bn - 1) // bn >= 4 * 132
        assert bn * bkb <= 2048 and bm * bn * bkb * 2 <= 64 * 32 * warps  # ≤ 64 products per thread
        assert bkb % inner == 0 and (blocksize // 2) % inner == 0
    assert gemv_mod._gemv_blocks(1, 4096, 14336, 64, 132)[1:3] == (4, 512)  # 16 bytes a thread, 4 rows
    assert gemv_mod._gemv_blocks(1, 14336, 4096, 64, 132)[1:3] == (16, 128)


@needs_triton
@device_params
def test_autocast_matches_the_reference(device):
    packed, state = _weight(24, 64, device)
    x, b, a, bb, _ = _inputs((3,), 64, 24, 8, device=device, dtype=torch.float32, lora_bias=False)
    results = []
    for fn in (qlora_gemv_triton, qlora_gemv_reference):
        with torch.autocast(device, dtype=torch.bfloat16):
            results.append(fn(x, packed, state, b, a, bb, 0.5))
    assert results[0].dtype == results[1].dtype == torch.bfloat16
    _assert_close(*results, 2e-2, "autocast")


@needs_triton
def test_dispatch(monkeypatch):
    packed, state = _weight(8, 64, "cpu")
    x, b, a, bb, lb = _inputs((4, 3), 64, 8, 4, device="cpu", dtype=torch.float32)
    want = qlora_gemv_reference(x, packed, state, b, a, bb, 0.5, lb)
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    assert torch.equal(qlora_gemv(x, packed, state, b, a, bb, 0.5, lb), want)
    if interpreting():
        monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
        got = qlora_gemv(x, packed, state, b, a, bb, 0.5, lb)
        assert torch.equal(got, qlora_gemv_triton(x, packed, state, b, a, bb, 0.5, lb))
        assert not torch.equal(got, want)  # it ran the kernel (float32 sums in another order), not the reference
        _assert_close(got, want, TOL[torch.float32])


def test_blocks_spanning_rows_are_an_error():
    # A flat quantization of 8·96 weights viewed as [8, 96]: a valid bnb layout whose blocks of 64 cross rows.
    packed, state = nf4_quantize(torch.randn(8 * 96), blocksize=64)
    state = dataclasses.replace(state, shape=torch.Size((8, 96)))
    x, _, a, bb, _ = _inputs((2,), 96, 8, 2, device="cpu", dtype=torch.float32, bias=False)
    assert qlora_gemv_reference(x, packed, state, None, a, bb, 1.0).shape == (2, 8)  # the reference takes it
    with pytest.raises(ValueError, match="multiple of the 4-bit blocksize"):
        qlora_gemv_triton(x, packed, state, None, a, bb, 1.0)
