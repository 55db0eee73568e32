"""kernels/common/lora_decode.py: the one-launch LoRA delta of inference at decode, against float64 references and
against the two-launch path, and its use by lora_linear / qlora_linear (inference only, at most 16 rows)."""
import dataclasses
import itertools
import sys

import pytest
import torch

from peft_fast.kernels import (dora_linear_reference, dora_linear_triton, lora_linear_reference, lora_linear_triton,
                               nf4_quantize_reference, qlora_linear_reference, qlora_linear_triton)
from peft_fast.kernels.common import lora_decode, settings
from peft_fast.kernels.common.dot_policy import dot_mode
from peft_fast.kernels.common.lora_decode import (DECODE_MAX_A_BYTES, DECODE_MAX_RANK, DECODE_MAX_ROWS, decodes,
                                                  mm_decode)

SHAPES = [(1, 40, 8, 24), (5, 130, 17, 70), (16, 64, 64, 200), (3, 8, 1, 5), (7, 33, 128, 19)]  # M, K, R, N


def _ref(x, a, b, y0, scale, bias, accumulate):
    d = (x.double() @ a.double()) @ b.double()
    if bias is not None:
        d = d + bias.double()
    return (y0.double() if accumulate else 0) + scale * d


@pytest.mark.triton
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{m}K{k}R{r}N{n}" for m, k, r, n in SHAPES])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matches_float64(device, shape, bias, accumulate):
    M, K, R, N = shape
    g = torch.Generator(device=device).manual_seed(M * K + R)
    x, a, b = (torch.randn(*s, dtype=torch.float64, device=device, generator=g) for s in ((M, K), (R, K), (N, R)))
    y0 = torch.randn(M, N, dtype=torch.float64, device=device, generator=g)
    bv = torch.randn(N, dtype=torch.float64, device=device, generator=g) if bias else None
    y = y0.clone()
    mm_decode(x, a.t(), b.t(), y, torch.float64, scale=0.7, accumulate=accumulate, bias=bv)
    torch.testing.assert_close(y, _ref(x, a.t(), b.t(), y0, 0.7, bv, accumulate), rtol=1e-12, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_and_strides(device, dtype, tol):
    """Activations and output in `dtype` with float32 adapters, x and y as strided views."""
    M, K, R, N = 6, 72, 12, 40
    x = torch.randn(K, M, device=device).to(dtype).t()  # column-major x
    a, b = torch.randn(R, K, device=device) / K**0.5, torch.randn(N, R, device=device) / R**0.5
    y0 = torch.randn(M, N, device=device).to(dtype)
    y = torch.empty(M, 2 * N, device=device, dtype=dtype)[:, ::2]  # every other column of a wider buffer
    y.copy_(y0)
    mm_decode(x, a.t(), b.t(), y, torch.float32, scale=2.0, accumulate=True)
    want = _ref(x, a.t(), b.t(), y0, 2.0, None, True)
    torch.testing.assert_close(y.double(), want, rtol=tol[dtype], atol=tol[dtype] * want.abs().max().item())


def test_decodes_only_inference_without_dropout_at_few_rows():
    a = torch.randn(8, 16)
    x = torch.randn(2, DECODE_MAX_ROWS // 2, 16)
    assert decodes(x, a, 0.0, grad=False)
    assert not decodes(x, a, 0.0, grad=True)
    assert not decodes(x, a, 0.1, grad=False)
    assert not decodes(torch.randn(DECODE_MAX_ROWS + 1, 16), a, 0.0, grad=False)
    assert not decodes(x, torch.randn(DECODE_MAX_RANK + 1, 16), 0.0, grad=False)
    assert not decodes(torch.randn(3, 0), a[:, :0], 0.0, grad=False)


def _count(monkeypatch):
    calls = []
    real = lora_decode.mm_decode

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    # the modules: the package's attributes of those names are the ops
    for op in ("lora_linear", "qlora_linear", "dora_linear"):
        monkeypatch.setattr(sys.modules[f"peft_fast.kernels.{op}"], "mm_decode", spy)
    return calls


@pytest.mark.triton
@pytest.mark.parametrize("rows", [1, 16, 17])
@pytest.mark.parametrize("weight", [True, False])
def test_lora_linear_inference_takes_one_launch_at_decode(device, monkeypatch, rows, weight):
    calls = _count(monkeypatch)
    x = torch.randn(rows, 48, dtype=torch.float64, device=device)
    w = torch.randn(20, 48, dtype=torch.float64, device=device) if weight else None
    bias = torch.randn(20, dtype=torch.float64, device=device) if weight else None
    a, b = (torch.randn(*s, dtype=torch.float64, device=device) for s in ((6, 48), (20, 6)))
    lb = torch.randn(20, dtype=torch.float64, device=device)
    with torch.no_grad():
        got = lora_linear_triton(x, w, bias, a, b, 1.5, 0.0, lb)
    torch.testing.assert_close(got, lora_linear_reference(x, w, bias, a, b, 1.5, 0.0, lb), rtol=1e-12, atol=1e-12)
    assert len(calls) == (rows <= DECODE_MAX_ROWS)
    with torch.no_grad():  # dropout's value matters only in training: the layers pass 0 in eval
        lora_linear_triton(x, w, bias, a, b, 1.5, 0.1, lb)
    lora_linear_triton(x.requires_grad_(), w, bias, a, b, 1.5, 0.0, lb)
    assert len(calls) == (rows <= DECODE_MAX_ROWS)


@pytest.mark.triton
@pytest.mark.parametrize("rows", [2, 17])
def test_qlora_linear_inference_takes_one_launch_at_decode(device, monkeypatch, rows):
    calls = _count(monkeypatch)
    packed, state = nf4_quantize_reference(torch.randn(24, 64, device=device), 64, compress_statistics=True)
    x = torch.randn(rows, 64, device=device)
    a, b = torch.randn(4, 64, device=device) / 8, torch.randn(24, 4, device=device) / 2
    bias = torch.randn(24, device=device)
    with torch.no_grad():
        got = qlora_linear_triton(x, packed, state, bias, a, b, 2.0)
    want = qlora_linear_reference(x, packed, state, bias, a, b, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == (rows <= DECODE_MAX_ROWS)


@pytest.mark.triton
@pytest.mark.parametrize("rows", [1, 16, 17])
@pytest.mark.parametrize("given", ["weight", "base"])
def test_dora_linear_inference_takes_one_launch_at_decode(device, monkeypatch, rows, given):
    """DoRA's epilogue c ⊙ (base + s·(x·Aᵀ)·Bᵀ) + b in the same launch, over our base output or the caller's."""
    calls = _count(monkeypatch)
    f64 = dict(dtype=torch.float64, device=device)
    x, w, bias = torch.randn(rows, 48, **f64), torch.randn(20, 48, **f64), torch.randn(20, **f64)
    a, b, c = torch.randn(6, 48, **f64), torch.randn(20, 6, **f64), torch.rand(20, **f64) + 0.5
    base = x @ w.t()
    want = dora_linear_reference(base.clone(), x, bias, a, b, 1.5, c)
    with torch.no_grad():
        if given == "weight":
            got = dora_linear_triton(None, x, bias, a, b, 1.5, c, w)
        else:
            got = dora_linear_triton(base, x, bias, a, b, 1.5, c)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(calls) == (rows <= DECODE_MAX_ROWS)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_decode_low_precision(device, dtype, tol):
    x, w = torch.randn(3, 64, device=device), torch.randn(40, 64, device=device) / 8
    bias = torch.randn(40, device=device)
    a, b = torch.randn(8, 64, device=device) / 8, torch.randn(40, 8, device=device) / 3
    c = torch.rand(40, device=device) + 0.5
    want = dora_linear_reference(None, x.double(), bias.double(), a.double(), b.double(), 2.0, c.double(), w.double())
    with torch.no_grad():
        got = dora_linear_triton(None, x.to(dtype), bias.to(dtype), a, b, 2.0, c, w.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol[dtype], atol=tol[dtype] * want.abs().max().item())


def test_dora_epilogue_needs_the_base_in_y():
    x, a, b = torch.randn(2, 8), torch.randn(8, 4), torch.randn(4, 8)
    with pytest.raises(ValueError, match="accumulate=True"):
        mm_decode(x, a, b, torch.empty(2, 8), torch.float32, scale=1.0, accumulate=False, dora_scale=torch.ones(8))


@pytest.mark.parametrize("lora_dot", ["half", "fp32"])
def test_decode_dots_meet_in_the_two_launch_dtypes(monkeypatch, lora_dot):
    """On a GPU (interpret=False) x·A meets as mm(x, Aᵀ, z) does and z·B as mm(z, Bᵀ, y) does. The interpreter
    always picks float32 dots, so this compares configurations: nothing launches."""
    monkeypatch.setattr(settings, "_current", dataclasses.replace(settings.current(), interpret=False,
                                                                  lora_dot=lora_dot))
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    for xd, ad, bd, yd in itertools.product(dtypes, repeat=4):
        zd = torch.float64 if torch.float64 in (xd, ad, bd) else torch.float32
        cfg = lora_decode.decode_config(4, 40, 72, 8, xd, ad, bd, yd, zd, "highest", settings.current())
        assert (cfg.dot_a, cfg.dot_b) == (dot_mode(xd, ad, zd), dot_mode(zd, bd, yd)), (xd, ad, bd, yd)


def test_decodes_bounds():
    a = torch.randn(DECODE_MAX_RANK, 16)
    assert decodes(torch.randn(2, 16), a, 0.0, grad=False)  # the largest rank still decodes
    big_in = DECODE_MAX_A_BYTES // (4 * 16) + 1  # rank 16 in float32: just over the bytes each program re-reads
    assert decodes(torch.randn(2, big_in - 1), torch.randn(16, big_in - 1), 0.0, grad=False)
    assert not decodes(torch.randn(2, big_in), torch.randn(16, big_in), 0.0, grad=False)
    assert decodes(torch.randn(2, big_in), torch.randn(16, big_in, dtype=torch.bfloat16), 0.0, grad=False)


def test_decodes_not_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not decodes(torch.randn(2, 16), torch.randn(4, 16), 0.0, grad=False)


@pytest.mark.triton
def test_dora_decode_leaves_a_strided_base_alone(device):
    """A base the caller passes as a strided view is not overwritten: only a contiguous one is ours to reuse."""
    x, w, a, b = (torch.randn(*s, device=device) for s in ((4, 32), (24, 32), (8, 32), (24, 8)))
    c, bias = torch.rand(24, device=device) + 0.5, torch.randn(24, device=device)
    buf = torch.randn(4, 48, device=device)
    base = buf[:, :24]
    base.copy_(x @ w.t())
    before = buf.clone()
    with torch.no_grad():
        y = dora_linear_triton(base, x, bias, a, b, 0.7, c)
    assert torch.equal(buf, before) and y.data_ptr() != base.data_ptr()
    torch.testing.assert_close(y, dora_linear_reference(base.clone(), x, bias, a, b, 0.7, c), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_decode_reads_no_padding(device):
    """Rank 5 and 3 rows, with NaN right past B's columns and past x's rows: masked loads never meet them."""
    store_b = torch.full((24, 21), float("nan"), device=device)
    store_b[:, :5] = torch.randn(24, 5, device=device)
    store_x = torch.full((20, 40), float("nan"), device=device)
    store_x[:3] = torch.randn(3, 40, device=device)
    x, a, b = store_x[:3], torch.randn(5, 40, device=device), store_b[:, :5]
    with torch.no_grad():
        got = lora_linear_triton(x, None, None, a, b, 0.5)
    torch.testing.assert_close(got, lora_linear_reference(x, None, None, a, b, 0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float64])
def test_delta_only_decode_is_in_the_adapters_dtype(device, x_dtype):
    x = torch.randn(3, 40, device=device).to(x_dtype)
    a, b = torch.randn(6, 40, device=device), torch.randn(24, 6, device=device)
    with torch.no_grad():
        got = lora_linear_triton(x, None, None, a, b, 0.5)
    want = lora_linear_reference(x, None, None, a, b, 0.5)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.triton
def test_qlora_decode_with_lora_bias_and_dropout(device):
    packed, state = nf4_quantize_reference(torch.randn(24, 64, device=device), 64)
    x, a = torch.randn(2, 64, device=device), torch.randn(4, 64, device=device) / 8
    b, lb = torch.randn(24, 4, device=device) / 2, torch.randn(24, device=device)
    with torch.no_grad():
        got = qlora_linear_triton(x, packed, state, None, a, b, 2.0, 0.0, lb)
        want = qlora_linear_reference(x, packed, state, None, a, b, 2.0, 0.0, lb)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(qlora_linear_triton(x, packed, state, None, a, b, 2.0, 0.9, lb), got)


@pytest.mark.triton
@pytest.mark.parametrize("rows", [3, 40])
def test_strided_vectors(device, rows):
    """A magnitude scale, bias or LoRA bias given as strided views reads the right elements (the kernels read the
    vectors as contiguous, so the ops make them so), on the decode path and the two-launch one."""
    f64 = dict(dtype=torch.float64, device=device)
    x, w = torch.randn(rows, 32, **f64), torch.randn(24, 32, **f64)
    a, b = torch.randn(4, 32, **f64), torch.randn(24, 4, **f64)
    c = torch.stack([torch.rand(24, **f64) + 0.5, torch.full((24,), 100.0, **f64)], 1)[:, 0]
    bias = torch.stack([torch.randn(24, **f64), torch.full((24,), 100.0, **f64)], 1)[:, 0]
    with torch.no_grad():
        got = dora_linear_triton(None, x, bias, a, b, 0.7, c, w)
        torch.testing.assert_close(got, dora_linear_reference(None, x, bias, a, b, 0.7, c, w), rtol=1e-10, atol=1e-10)
        got = lora_linear_triton(x, w, None, a, b, 0.7, 0.0, bias)
        torch.testing.assert_close(got, lora_linear_reference(x, w, None, a, b, 0.7, 0.0, bias), rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.triton
def test_zero_features(device):
    """No in or out features: an empty output of the right shape, as the references give."""
    x0, a0, b0 = torch.randn(3, 0, device=device), torch.randn(4, 0, device=device), torch.randn(5, 4, device=device)
    with torch.no_grad():
        assert lora_linear_triton(x0, None, None, a0, b0, 1.0).shape == (3, 5)
        x, a, b = torch.randn(3, 8, device=device), torch.randn(4, 8, device=device), torch.randn(0, 4, device=device)
        base = torch.randn(3, 0, device=device)
        assert dora_linear_triton(base, x, None, a, b, 1.0, torch.ones(0, device=device)).shape == (3, 0)
