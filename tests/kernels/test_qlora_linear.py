"""kernels/qlora_linear.py: the Triton path (NF4 dequantize + cuBLAS, LoRA kernels) vs the reference; the reference vs
PEFT + bitsandbytes."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from peft_fast.kernels import (  # noqa: E402
    interpreting,
    lora_linear_triton,
    nf4_dequantize_reference,
    nf4_from_bnb,
    nf4_quantize,
    nf4_state_from_bnb,
    qlora_linear,
    qlora_linear_reference,
    qlora_linear_triton,
)
from switches import use_settings




def _weight(out_f, in_f, device, blocksize=64, nested=False, quant_type="nf4"):
    w = torch.randn(out_f, in_f, device=device) / in_f**0.5
    return nf4_quantize(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def _inputs(lead, in_f, out_f, r, *, device, dtype, adapter_dtype=None, bias=True, lora_bias=True, grad_bias=False):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, in_f, dtype=dtype, device=device).requires_grad_()
    b = torch.randn(out_f, dtype=dtype, device=device).requires_grad_(grad_bias) if bias else None
    a = (torch.randn(r, in_f, dtype=adapter_dtype, device=device) / in_f**0.5).requires_grad_()
    bb = (torch.randn(out_f, r, dtype=adapter_dtype, device=device) / r**0.5).requires_grad_()
    lb = torch.randn(out_f, dtype=adapter_dtype, device=device).requires_grad_() if lora_bias else None
    return x, b, a, bb, lb


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _assert_close(got, want, tol, what=""):
    assert got.shape == want.shape, what
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max err {err:.3e} vs max |ref| {scale:.3e} (rel tol {tol})"


def _run(fn, packed, state, inputs, scaling, dropout_p=0.0):
    x, b, a, bb, lb = inputs
    y = fn(x, packed, state, b, a, bb, scaling, dropout_p, lb)
    g = torch.Generator(device="cpu").manual_seed(0)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    return y, torch.autograd.grad(y, leaves, dy)


def _compare(packed, state, inputs, scaling, tol):
    """Triton vs the reference in float64 on the same dequantized values (exact in fp32, so exact in fp64)."""
    y_t, g_t = _run(qlora_linear_triton, packed, state, inputs, scaling)
    y_r, g_r = _run(qlora_linear_reference, packed, state, [_f64(t) for t in inputs], scaling)
    assert y_t.dtype == inputs[0].dtype
    _assert_close(y_t, y_r, tol, "forward")
    for i, (gt, gr) in enumerate(zip(g_t, g_r)):
        assert gt.dtype == [t for t in inputs if t is not None and t.requires_grad][i].dtype
        _assert_close(gt, gr, tol, f"grad {i}")


SHAPES = [((3, 7), 37, 5), ((1,), 77, 16), ((2, 45), 130, 8)]  # (lead, out, r): odd M and out; 2+ tiles in M, N


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-out{s[1]}-r{s[2]}")
def test_matches_reference(device, shape, blocksize, nested, dtype, tol):
    lead, out_f, r = shape
    in_f = blocksize * (3 if lead == (2, 45) else 2)  # several K tiles of 64 (every tile within one NF4 block)
    packed, state = _weight(out_f, in_f, device, blocksize, nested)
    inputs = _inputs(lead, in_f, out_f, r, device=device, dtype=dtype, grad_bias=True)
    _compare(packed, state, inputs, 0.37, tol[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("nested", [False, True])
def test_one_output_and_an_odd_input_size(device, nested, tol):
    """A [1, 45] weight packs 45 codes into 23 bytes: the input size must not be derived from the packed size."""
    packed, state = _weight(1, 45, device, 64, nested)
    inputs = _inputs((5,), 45, 1, 2, device=device, dtype=torch.float64, grad_bias=True)
    _compare(packed, state, inputs, 0.37, tol[torch.float64])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_low_precision_against_float64(device, dtype, nested, tol):
    packed, state = _weight(37, 128, device, 64, nested)
    inputs = _inputs((3, 7), 128, 37, 5, device=device, dtype=dtype, adapter_dtype=torch.float32)
    _compare(packed, state, inputs, 2.0, tol[dtype])


@pytest.mark.triton
def test_fp4(device, tol):
    packed, state = _weight(29, 128, device, 128, True, "fp4")
    _compare(packed, state, _inputs((11,), 128, 29, 4, device=device, dtype=torch.float32), 0.5, tol[torch.float32])


def _bnb_layer(in_f, out_f, nested, blocksize=64, bias=True, compute_dtype=torch.float32):
    q = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, compress_statistics=nested,
                          quant_type="nf4", quant_storage=torch.uint8)
    q.load_state_dict(torch.nn.Linear(in_f, out_f, bias=bias).state_dict())
    q.weight.blocksize = blocksize
    return q.to("cpu")  # bnb quantizes on the move to a device


@pytest.mark.parametrize("nested", [False, True])
def test_reference_base_is_bnb_linear4bit(nested):
    torch.manual_seed(0)
    layer = _bnb_layer(128, 23, nested).train()
    packed, state = nf4_from_bnb(layer)
    x = torch.randn(3, 5, 128, requires_grad=True)
    want = layer(x)
    zero_a, zero_b = torch.zeros(1, 128), torch.zeros(23, 1)
    got = qlora_linear_reference(x, packed, state, layer.bias, zero_a, zero_b, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("nested", [False, True])
def test_bnb_weight_through_triton(nested, device, tol):
    torch.manual_seed(1)
    layer = _bnb_layer(256, 41, nested, blocksize=128)
    packed, state = nf4_from_bnb(layer)
    packed, state = packed.to(device), state.to(device)
    assert state.blocksize == 128 and state.nested == nested
    inputs = _inputs((9,), 256, 41, 6, device=device, dtype=torch.float32)
    inputs = (inputs[0], layer.bias.detach().to(device), *inputs[2:])
    _compare(packed, state, inputs, 0.8, tol[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_reference_is_peft_over_bnb_bit_for_bit(dropout, dtype):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(_bnb_layer(128, 20, nested=True, compute_dtype=dtype))
    base.is_loaded_in_4bit = True  # as transformers marks it: PEFT then picks its bnb LoRA layer, not lora.Linear
    cfg = peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=12, lora_dropout=dropout, lora_bias=True)
    model = peft.get_peft_model(base, cfg).train()
    layer = model.base_model.model[0]
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer).__name__ == "Linear4bit"
    a, b, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    assert a.dtype == torch.float32
    with torch.no_grad():
        b.normal_()
        lb.normal_()
    packed, state = nf4_from_bnb(layer.base_layer)
    x = torch.randn(2, 5, 128, dtype=dtype, requires_grad=True)
    torch.manual_seed(11)
    want = model(x)
    torch.manual_seed(11)
    got = qlora_linear_reference(x, packed, state, layer.base_layer.bias, a, b, layer.scaling["default"], dropout, lb)
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)
    dy = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, (x, a, b, lb), dy), torch.autograd.grad(want, (x, a, b, lb), dy)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.triton
def test_dropout_same_mask_forward_and_backward(device):
    p, seed, lead, in_f, out_f = 0.4, 1234, (3, 7), 64, 29
    # lora_linear's identity-adapter trick: the same _mm kernel, seed draw and element indexing give our mask.
    x0 = torch.randn(*lead, in_f, dtype=torch.float64, device=device)
    eye = torch.eye(in_f, dtype=torch.float64, device=device)
    torch.manual_seed(seed)
    mask = lora_linear_triton(x0, None, None, eye, eye, 1.0, p) / x0
    assert 0.2 < (mask == 0).double().mean().item() < 0.6
    packed, state = _weight(out_f, in_f, device)
    inputs = _inputs(lead, in_f, out_f, 5, device=device, dtype=torch.float64)
    torch.manual_seed(seed)
    y_t, g_t = _run(qlora_linear_triton, packed, state, inputs, 0.5, p)
    w = nf4_dequantize_reference(packed, dataclasses.replace(state, dtype=torch.float32)).double()

    def masked(x, _packed, _state, b, a, bb, s, _p, lb):
        return F.linear(x, w, b) + F.linear(F.linear(x * mask, a), bb, lb) * s

    y_r, g_r = _run(masked, packed, state, inputs, 0.5)
    _assert_close(y_t, y_r, 1e-10, "forward")
    for i, (gt, gr) in enumerate(zip(g_t, g_r)):
        _assert_close(gt, gr, 1e-10, f"grad {i}")


@pytest.mark.triton
def test_torch_compile_fullgraph(device):
    packed, state = _weight(29, 128, device, 64, nested=True)
    x, b, a, bb, lb = _inputs((3, 7), 128, 29, 5, device=device, dtype=torch.float32, grad_bias=True)

    def fn(x, b, a, bb, lb):
        return qlora_linear_triton(x, packed, state, b, a, bb, 0.5, 0.3, lb)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = (x, b, a, bb, lb)
    torch.manual_seed(3)
    y_e = fn(*leaves)
    g_e = torch.autograd.grad(y_e.square().sum(), leaves)
    torch.manual_seed(3)
    y_c = compiled(*leaves)
    g_c = torch.autograd.grad(y_c.square().sum(), leaves)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for gc, ge in zip(g_c, g_e):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)


@pytest.mark.triton
def test_dispatch(monkeypatch):
    packed, state = _weight(8, 64, "cpu")
    x, b, a, bb, lb = _inputs((4, 3), 64, 8, 4, device="cpu", dtype=torch.float32)
    torch.manual_seed(5)
    want = qlora_linear_reference(x, packed, state, b, a, bb, 0.5, 0.2, lb)
    use_settings(monkeypatch, backend="torch")
    torch.manual_seed(5)
    assert torch.equal(qlora_linear(x, packed, state, b, a, bb, 0.5, 0.2, lb), want)
    if interpreting():
        use_settings(monkeypatch, backend="triton")
        got = qlora_linear(x, packed, state, b, a, bb, 0.5, 0.0, lb)
        assert torch.equal(got, qlora_linear_triton(x, packed, state, b, a, bb, 0.5, 0.0, lb))


@pytest.mark.triton
@pytest.mark.parametrize("nested", [False, True])
def test_blocks_spanning_rows(nested, device, tol):
    """bnb allows blocks of 64 across rows (in_features 96)."""
    w = torch.randn(9, 96)
    packed, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    packed, state = packed.to(device), nf4_state_from_bnb(qs).to(device)
    inputs = _inputs((2, 3), 96, 9, 2, device=device, dtype=torch.float32, grad_bias=True)
    _compare(packed, state, inputs, 0.7, tol[torch.float32])


@pytest.mark.triton
def test_autocast_matches_the_reference(device):
    """Autocast does not reach inside the custom op: x and the bias are cast as it would cast them; backward works."""
    packed, state = _weight(24, 64, device)
    x, b, a, bb, _ = _inputs((2, 9), 64, 24, 8, device=device, dtype=torch.float32, lora_bias=False)
    results = []
    for fn in (qlora_linear_triton, qlora_linear_reference):
        with torch.autocast(device, dtype=torch.bfloat16):
            y = fn(x, packed, state, b, a, bb, 0.5)
        assert y.dtype == torch.bfloat16
        results.append((y.float(), *torch.autograd.grad(y.float().pow(2).sum(), (x, a, bb))))
    for got, want in zip(*results):
        assert ((got - want).norm() / want.norm()).item() < 2e-2
