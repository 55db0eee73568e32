"""kernels/dora_dropout_linear.py: DoRA with dropout (Triton, interpreter or GPU) against PEFT's formula given the same
mask, in float64, forward and backward (x, A, B, the magnitude through c, bias, a trainable base weight), odd shapes,
strides, zero magnitudes, 16-bit against float64, and torch.compile. The mask oracle is LoRA's op with identity
adapters, a second route to the seed's mask."""
import pytest
import torch
import torch.nn.functional as F
from dora_inputs import dora_inputs as _inputs
from switches import use_settings

from peft_fast.kernels import (dora_dropout_linear, dora_dropout_linear_reference, dora_dropout_linear_triton,
                               lora_linear_triton)

P = 0.3


def _mask(shape, seed, device, p=P):
    """The keep-multiplier the seed gives x of this shape, through LoRA's op: with A = B = I it is drop(x)."""
    x = torch.rand(shape, dtype=torch.float64, device=device) + 0.5
    eye = torch.eye(shape[-1], dtype=torch.float64, device=device)
    torch.manual_seed(seed)
    return lora_linear_triton(x, None, None, eye, eye, 1.0, p) / x


def _run(fn, inputs, s, gy, seed):
    x, w, bias, a, b, m, norm = inputs
    torch.manual_seed(seed)
    y = fn(x, w, bias, a, b, s, m / norm)
    leaves = [t for t in (x, a, b, m, bias, w) if t is not None and t.requires_grad]
    return y, torch.autograd.grad(y, leaves, gy)


def _pair(inputs, lead, out_f, seed=5, s=1.7):
    device = inputs[0].device
    mask = _mask((*lead, inputs[0].shape[-1]), seed, device).to(inputs[0].dtype)
    gy = torch.randn(*lead, out_f, dtype=torch.float64, device=device).to(inputs[0].dtype)  # the same in every dtype
    got = _run(lambda *a: dora_dropout_linear_triton(*a, P), inputs, s, gy, seed)
    want = _run(lambda *a: dora_dropout_linear_reference(*a, mask), inputs, s, gy, seed)
    return got, want


@pytest.mark.triton
@pytest.mark.parametrize("lead,in_f,out_f,r", [((1,), 1, 1, 1), ((7,), 33, 20, 3), ((2, 5), 64, 130, 16),
                                               ((3, 17), 100, 70, 70)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_w", [False, True])
def test_triton_matches_reference_float64(device, lead, in_f, out_f, r, bias, train_w):
    inputs = _inputs(lead, in_f, out_f, r, device, bias=bias, train_w=train_w)
    (y, g), (y_ref, g_ref) = _pair(inputs, lead, out_f)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        assert want.abs().sum() > 0 or in_f == 1  # (a single dropped entry of x zeroes dA and dx)


@pytest.mark.triton
def test_the_mask_is_applied_and_is_the_lora_matmuls_mask(device):
    """Against the reference without dropout the outputs differ; with the LoRA op's mask they agree (above)."""
    lead, out_f = (4, 6), 24
    inputs = _inputs(lead, 40, out_f, 5, device)
    (y, _), _ = _pair(inputs, lead, out_f)
    ones = torch.ones(*lead, 40, dtype=torch.float64, device=device)
    x, w, bias, a, b, m, norm = inputs
    no_drop = dora_dropout_linear_reference(x, w, bias, a, b, 1.7, m / norm, ones)
    assert (y - no_drop).abs().max() > 1e-3


@pytest.mark.triton
def test_strided_adapters_and_input(device):
    lead, out_f = (4, 6), 24
    inputs = list(_inputs(lead, 40, out_f, 5, device))
    inputs[3] = inputs[3].detach().T.contiguous().T.requires_grad_()  # A, B in transposed storage
    inputs[4] = inputs[4].detach().T.contiguous().T.requires_grad_()
    inputs[0] = inputs[0].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not inputs[3].is_contiguous() and not inputs[0].is_contiguous()
    (y, g), (y_ref, g_ref) = _pair(tuple(inputs), lead, out_f)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.triton
def test_zero_magnitudes(device):
    """c = 0 channels: the adapter's part of dc is 0 there (dora_linear's convention); everything else exact."""
    lead, out_f = (9,), 12
    inputs = _inputs(lead, 16, out_f, 4, device, zero_c=True)
    (y, g), (y_ref, g_ref) = _pair(inputs, lead, out_f)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    names = ["x", "a", "b", "m", "bias"]
    live = inputs[5].detach() != 0
    for name, got, want in zip(names, g, g_ref):
        if name == "m":
            x, w, _, _, _, _, norm = inputs
            mask = _mask((*lead, 16), 5, device)  # as _pair: the mask, then its gy
            gy = torch.randn(*lead, out_f, dtype=torch.float64, device=device)
            v = F.linear(x.detach() * mask, w)
            dead = ((gy * v).reshape(-1, out_f).sum(0) / norm)[~live]  # Σ dy ⊙ v only (through c = m / norm)
            torch.testing.assert_close(got[~live], dead, rtol=1e-9, atol=1e-10, msg="dead channels")
            got, want = got[live], want[live]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.triton
@pytest.mark.parametrize("trains", ["a", "b", "m", "x", "x,b", "m,w", "bias"])
def test_each_gradient_alone(device, trains):
    """Any subset of inputs may train (frozen adapters while only the magnitude trains: dB is still needed)."""
    lead, out_f = (3, 5), 18
    x, w, bias, a, b, m, norm = _inputs(lead, 20, out_f, 4, device)
    flags = dict(x=x, a=a, b=b, m=m, bias=bias, w=w)
    for name, t in flags.items():
        t.requires_grad_(name in trains.split(","))
    (y, g), (y_ref, g_ref) = _pair((x, w, bias, a, b, m, norm), lead, out_f)
    assert len(g) == len(trains.split(","))
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.triton
@pytest.mark.parametrize("x_layout", ["contiguous", "column-major"])
def test_custom_ops_pass_opcheck(device, x_layout):
    """The fake implementations' shapes, dtypes and strides against the real ones, and the autograd registration."""
    from peft_fast.kernels.common.lora_mm import dropout_seed

    x, w, bias, a, b, m, norm = (t.detach() if t is not None else t for t in _inputs((10,), 24, 12, 4, device))
    if x_layout == "column-major":
        x = x.t().contiguous().t()
    c = (m / norm).requires_grad_()
    args = (x.requires_grad_(), w, bias, a.requires_grad_(), b.requires_grad_(), c, 1.3, P, dropout_seed(x.device))
    torch.library.opcheck(torch.ops.peft_fast.dora_dropout_linear_fwd.default, args)
    _, z, v = torch.ops.peft_fast.dora_dropout_linear_fwd(*args)
    dy = torch.randn(10, 12, dtype=torch.float64, device=device)
    bwd = (dy, x.detach(), w, a.detach(), b.detach(), z, v, c.detach(), args[-1], 1.3, P, True, True, True, True, False)
    torch.library.opcheck(torch.ops.peft_fast.dora_dropout_linear_bwd.default, bwd)


@pytest.mark.triton
def test_autocast_and_a_bias_of_another_dtype(device):
    """Under autocast the base operands take its dtype, as F.linear's would (the adapters stay float32)."""
    lead, out_f = (2, 7), 16
    x, w, bias, a, b, m, norm = (t.detach().float() for t in _inputs(lead, 32, out_f, 4, device))
    seed = 9
    mask = _mask((*lead, 32), seed, device).float()
    torch.manual_seed(seed)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = dora_dropout_linear_triton(x, w, bias, a, b, 1.5, m / norm, P)
    want = dora_dropout_linear_reference(x.bfloat16(), w.bfloat16(), bias.bfloat16(), a, b, 1.5, m / norm,
                                         mask.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (y.float() - want.float()).abs().max() / want.float().abs().max() < 2e-2
    torch.manual_seed(seed)
    y16 = dora_dropout_linear_triton(x.bfloat16(), w.bfloat16(), bias, a, b, 1.5, m / norm, P)  # a float32 bias
    assert y16.dtype == torch.bfloat16 and (y16.float() - want.float()).abs().max() / want.float().abs().max() < 2e-2
    with pytest.raises(ValueError, match="one dtype"):
        dora_dropout_linear_triton(x.bfloat16(), w, bias, a, b, 1.5, m / norm, P)


@pytest.mark.triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_low_precision_against_float64(device, dtype, tol):
    lead, in_f, out_f, r = (3, 11), 48, 40, 8
    x64 = _inputs(lead, in_f, out_f, r, device)
    low = tuple(None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in x64)
    low = (low[0], low[1], low[2], x64[3].detach().float().requires_grad_(), x64[4].detach().float()
           .requires_grad_(), x64[5].detach().float().requires_grad_(), x64[6].float())  # fp32 adapters, as PEFT
    (y, g), _ = _pair(low, lead, out_f)
    (y64, g64), _ = _pair(x64, lead, out_f)
    scale = y64.abs().max()
    assert (y.double() - y64).abs().max() / scale < tol
    for got, want in zip(g, g64):
        assert (got.double() - want).abs().max() / want.abs().max() < tol


@pytest.mark.triton
def test_seeding(device):
    x, w, bias, a, b, m, norm = _inputs((5, 3), 32, 16, 4, device)

    def run(seed):
        torch.manual_seed(seed)
        return dora_dropout_linear_triton(x, w, bias, a, b, 1.0, m / norm, P)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


@pytest.mark.triton
def test_torch_compile_fullgraph_matches_eager(device):
    lead, out_f = (2, 5), 20
    inputs = _inputs(lead, 24, out_f, 4, device)
    gy = torch.randn(*lead, out_f, dtype=torch.float64, device=device)

    def fn(x, w, bias, a, b, s, c):
        return dora_dropout_linear_triton(x, w, bias, a, b, s, c, P)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y_c, g_c = _run(compiled, inputs, 1.3, gy, 3)
    y_e, g_e = _run(fn, inputs, 1.3, gy, 3)
    torch.testing.assert_close(y_c, y_e, rtol=1e-12, atol=1e-12)
    for got, want in zip(g_c, g_e):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dispatch_and_bad_arguments(monkeypatch):
    x, w, bias, a, b, m, norm = _inputs((3,), 8, 6, 2, "cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        dora_dropout_linear(x, w, bias, a, b, 1.0, m / norm, 0.0)
    with pytest.raises(ValueError, match="do not fit"):
        dora_dropout_linear(x, w[:, :4], bias, a, b, 1.0, m / norm, 0.2)
    use_settings(monkeypatch, backend="torch")  # the reference path, with torch's dropout drawing the mask
    torch.manual_seed(0)
    y = dora_dropout_linear(x, w, bias, a, b, 1.0, m / norm, 0.5)
    torch.manual_seed(0)
    mask = F.dropout(torch.ones_like(x), 0.5)
    torch.testing.assert_close(y, dora_dropout_linear_reference(x, w, bias, a, b, 1.0, m / norm, mask))
