"""kernels/dora_norm.py: Triton (interpreter or GPU) vs the reference in float64, both vs the direct norm
||W + s·B·A|| (PEFT's definition); odd shapes, strides, the cached ||W||², NF4 bases with and without double quant."""
import pytest
import torch

from peft_fast.kernels import (
    dora_norm,
    dora_norm_nf4,
    dora_norm_nf4_reference,
    dora_norm_nf4_triton,
    dora_norm_reference,
    dora_norm_triton,
    nf4_dequantize_reference,
    nf4_quantize,
)



def _direct(w, a, b, s):
    """PEFT's get_weight_norm: the dense sum, then the row norms (here in float64)."""
    return torch.linalg.norm(w.double() + s * (b.double() @ a.double()), dim=1)


def _adapter(out_f, in_f, r, dtype, device, big=False):
    a = torch.randn(r, in_f, dtype=dtype, device=device) / in_f**0.5
    b = torch.randn(out_f, r, dtype=dtype, device=device) * (1.0 if big else 0.1)
    return a, b


SHAPES = [(1, 1, 1), (7, 5, 3), (33, 70, 4), (64, 128, 16), (100, 37, 9), (129, 65, 33), (40, 300, 70)]


@pytest.mark.parametrize("out_f,in_f,r", SHAPES)
def test_reference_matches_direct_norm(out_f, in_f, r):
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    a, b = _adapter(out_f, in_f, r, torch.float64, "cpu", big=True)
    norm, sq = dora_norm_reference(w, a, b, 1.7)
    torch.testing.assert_close(norm, _direct(w, a, b, 1.7), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sq, (w * w).sum(1), rtol=1e-12, atol=1e-12)
    assert norm.dtype == torch.float64 and not norm.requires_grad


@pytest.mark.triton
@pytest.mark.parametrize("out_f,in_f,r", SHAPES)
@pytest.mark.parametrize("cached", [False, True])
def test_triton_float64_vs_reference(device, out_f, in_f, r, cached):
    w = torch.randn(out_f, in_f, dtype=torch.float64, device=device)
    a, b = _adapter(out_f, in_f, r, torch.float64, device, big=True)
    s = 0.37
    ref_norm, ref_sq = dora_norm_reference(w, a, b, s)
    given = ref_sq.clone() if cached else None
    norm, sq = dora_norm_triton(w, a, b, s, weight_sq=given)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(norm, _direct(w, a, b, s), rtol=1e-10, atol=1e-12)


@pytest.mark.triton
def test_triton_cached_weight_sq_is_used(device):
    """A given ||W||² is trusted, not recomputed: a wrong one changes the result (the cache is really read)."""
    w = torch.randn(20, 48, dtype=torch.float64, device=device)
    a, b = _adapter(20, 48, 4, torch.float64, device)
    _, sq = dora_norm_triton(w, a, b, 2.0)
    norm_off, _ = dora_norm_triton(w, a, b, 2.0, weight_sq=sq + 1.0)
    ref_off, _ = dora_norm_reference(w, a, b, 2.0, weight_sq=sq + 1.0)
    torch.testing.assert_close(norm_off, ref_off, rtol=1e-11, atol=1e-12)
    assert (norm_off - dora_norm_triton(w, a, b, 2.0)[0]).abs().min() > 1e-3


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_low_precision_weight(device, dtype):
    """W in the base dtype (here float32 or bf16), adapters float32, as the layers call it: float32 accumulation."""
    w = torch.randn(96, 160, device=device).to(dtype)
    a, b = _adapter(96, 160, 8, torch.float32, device)
    norm, _ = dora_norm_triton(w, a, b, 2.0)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), _direct(w.float(), a, b, 2.0), rtol=2e-6, atol=1e-6)


@pytest.mark.triton
def test_triton_strided_weight_and_adapters(device):
    """fan_in_fan_out hands W as a transposed view; adapters may be non-contiguous too."""
    w_t = torch.randn(70, 45, dtype=torch.float64, device=device)  # [in, out] storage, as GPT-2's Conv1D
    w = w_t.T
    a = (torch.randn(70, 6, dtype=torch.float64, device=device) / 9).T  # [r, in], strided
    b = torch.randn(6, 45, dtype=torch.float64, device=device).T        # [out, r], strided
    assert not (w.is_contiguous() or a.is_contiguous() or b.is_contiguous())
    norm, _ = dora_norm_triton(w, a, b, 1.25)
    torch.testing.assert_close(norm, _direct(w, a, b, 1.25), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(norm, dora_norm_reference(w, a, b, 1.25)[0], rtol=1e-11, atol=1e-12)


def _nf4(out_f, in_f, device, blocksize=64, nested=False, dtype=torch.float32):
    w = (torch.randn(out_f, in_f, device=device) / in_f**0.5).to(dtype)
    return nf4_quantize(w, blocksize=blocksize, compress_statistics=nested)


@pytest.mark.triton
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("out_f,in_f,r,blocksize", [(33, 64, 4, 64), (70, 256, 9, 128), (16, 96, 1, 32),
                                                    (5, 512, 20, 256)])
def test_nf4_triton_vs_reference(device, nested, out_f, in_f, r, blocksize):
    packed, state = _nf4(out_f, in_f, device, blocksize, nested)
    a, b = _adapter(out_f, in_f, r, torch.float64, device, big=True)
    ref_norm, ref_sq = dora_norm_nf4_reference(packed, state, a, b, 0.8)
    norm, sq = dora_norm_nf4_triton(packed, state, a, b, 0.8)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-11, atol=1e-12)
    w = nf4_dequantize_reference(packed, state)
    torch.testing.assert_close(norm, _direct(w, a, b, 0.8), rtol=1e-10, atol=1e-12)
    cached, _ = dora_norm_nf4_triton(packed, state, a, b, 0.8, weight_sq=ref_sq)
    torch.testing.assert_close(cached, ref_norm, rtol=1e-11, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_triton_rounds_weight_as_bnb(device, dtype):
    """bnb dequantizes into the state's dtype before PEFT takes the norm: the kernel rounds in registers the same
    way."""
    packed, state = _nf4(48, 128, device, 64, False, dtype)
    a, b = _adapter(48, 128, 4, torch.float64, device)
    norm, _ = dora_norm_nf4_triton(packed, state, a, b, 1.0)
    w = nf4_dequantize_reference(packed, state)
    assert w.dtype == dtype
    torch.testing.assert_close(norm, _direct(w, a, b, 1.0), rtol=1e-10, atol=1e-12)


def test_dispatch_and_errors():
    w = torch.randn(6, 10)
    a, b = _adapter(6, 10, 2, torch.float32, "cpu")
    norm, sq = dora_norm(w, a, b, 1.0)
    torch.testing.assert_close(norm.double(), _direct(w, a, b, 1.0), rtol=1e-5, atol=1e-6)
    packed, state = _nf4(6, 64, "cpu")
    a4, b4 = _adapter(6, 64, 2, torch.float32, "cpu")
    norm4, _ = dora_norm_nf4(packed, state, a4, b4, 1.0)
    torch.testing.assert_close(norm4.double(), _direct(nf4_dequantize_reference(packed, state), a4, b4, 1.0),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lora_a"):
        dora_norm(w, a.T, b, 1.0)
    with pytest.raises(ValueError, match="weight_sq"):
        dora_norm(w, a, b, 1.0, weight_sq=torch.ones(5))


def test_gradients_do_not_flow():
    w = torch.randn(6, 10)
    a = torch.randn(2, 10, requires_grad=True)
    b = torch.randn(6, 2, requires_grad=True)
    norm, _ = dora_norm(w, a, b, 1.0)
    assert not norm.requires_grad


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_cancelled_row_has_a_finite_norm(device, dtype):
    """Rows where W = -s·B·A: ||W + s·B·A|| is 0, and the expansion's rounding may make ||·||² slightly negative;
    the kernel clamps at 0 before the square root, as the reference does (no NaN)."""
    g = torch.Generator().manual_seed(5)
    out_f, in_f, r, s = 64, 48, 6, 0.8
    a = torch.randn(r, in_f, dtype=torch.float64, generator=g) / in_f**0.5
    b = torch.randn(out_f, r, dtype=torch.float64, generator=g)
    w = torch.randn(out_f, in_f, dtype=torch.float64, generator=g)
    w[::2] = -s * (b @ a)[::2]
    w, a, b = (t.to(device=device, dtype=dtype) for t in (w, a, b))
    norm, _ = dora_norm_triton(w, a, b, s)
    ref, _ = dora_norm_reference(w, a, b, s)
    assert torch.isfinite(norm).all(), f"{int((~torch.isfinite(norm)).sum())} rows are not finite"
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(norm.double(), ref.double(), rtol=1e3 * eps, atol=10 * eps**0.5 * ref.abs().max().item())


@pytest.mark.triton
def test_ranks_beyond_the_kernels_tile_take_the_reference(device, monkeypatch):
    """At r > 256 the kernel's r x r tile of A·Aᵀ needs more shared memory than an sm_90 block has (found by
    bench/compile_check.py): the dispatchers take the reference, the Triton entry points refuse."""
    from switches import use_settings

    from peft_fast.kernels.dora_norm import MAX_TRITON_RANK

    use_settings(monkeypatch, backend="triton")
    r = MAX_TRITON_RANK + 1
    w = torch.randn(8, 64, dtype=torch.float64, device=device)
    a, b = _adapter(8, 64, r, torch.float64, device)
    torch.testing.assert_close(dora_norm(w, a, b, 0.5)[0], _direct(w, a, b, 0.5))
    with pytest.raises(ValueError, match="shared memory"):
        dora_norm_triton(w, a, b, 0.5)
    packed, state = nf4_quantize(w.float(), blocksize=64)
    want = dora_norm_nf4_reference(packed, state, a, b, 0.5)[0]
    torch.testing.assert_close(dora_norm_nf4(packed, state, a, b, 0.5)[0], want)
    with pytest.raises(ValueError, match="shared memory"):
        dora_norm_nf4_triton(packed, state, a, b, 0.5)
