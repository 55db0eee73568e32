"""kernels/lora_linear.py: the Triton path against the reference, the reference against PEFT."""
import pytest
import torch

from peft_fast.kernels import (
    interpreting,
    lora_linear,
    lora_linear_reference,
    lora_linear_triton,
)
from peft_fast.kernels.lora_linear import lora_linear_masked_reference
from switches import use_settings




def _inputs(lead, in_f, out_f, r, *, device, dtype=torch.float64, adapter_dtype=None, weight="plain", bias=True,
            lora_bias=False, grad_base=False):
    """Random everything (no zero-initialised lora_B), leaves requiring grad where a LoRA layer would."""
    adapter_dtype = adapter_dtype or dtype
    kw = dict(device=device)
    x = torch.randn(*lead, in_f, dtype=dtype, **kw).requires_grad_()
    w = None
    if weight == "plain":
        w = torch.randn(out_f, in_f, dtype=dtype, **kw) / in_f**0.5
    elif weight == "transposed":  # a Conv1D-style [in, out] parameter seen through .t()
        w = (torch.randn(in_f, out_f, dtype=dtype, **kw) / in_f**0.5).t()
    b = torch.randn(out_f, dtype=dtype, **kw) if (bias and w is not None) else None
    a = (torch.randn(r, in_f, dtype=adapter_dtype, **kw) / in_f**0.5).requires_grad_()
    bb = (torch.randn(out_f, r, dtype=adapter_dtype, **kw) / r**0.5).requires_grad_()
    lb = torch.randn(out_f, dtype=adapter_dtype, **kw).requires_grad_() if lora_bias else None
    if grad_base:
        if w is not None:
            w.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return x, w, b, a, bb, lb


def _leaves(*ts):
    return [t for t in ts if t is not None and t.requires_grad]


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _assert_close(got, want, tol, what=""):
    assert got.shape == want.shape, what
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max err {err:.3e} vs max |ref| {scale:.3e} (rel tol {tol})"


def _run(fn, inputs, scaling, dropout_p=0.0, grad_seed=0):
    """Forward, then backward with a fixed random upstream gradient; returns output and leaf grads."""
    x, w, b, a, bb, lb = inputs
    y = fn(x, w, b, a, bb, scaling, dropout_p, lb)
    g = torch.Generator(device="cpu").manual_seed(grad_seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    leaves = _leaves(x, w, b, a, bb, lb)
    grads = torch.autograd.grad(y, leaves, dy)
    return y, grads


def _compare(inputs, scaling, tol, dropout_p=0.0):
    y_t, g_t = _run(lora_linear_triton, inputs, scaling)
    y_r, g_r = _run(lora_linear_reference, [_f64(t) for t in inputs], scaling)
    _assert_close(y_t, y_r, tol, "forward")
    for i, (gt, gr) in enumerate(zip(g_t, g_r)):
        _assert_close(gt, gr, tol, f"grad {i}")
    return y_t, g_t


CASES = [  # (lead dims, in, out, r, weight, bias, lora_bias, grad_base)
    ((3, 7), 45, 29, 1, "plain", True, False, True),
    ((3, 7), 45, 29, 5, "transposed", True, True, True),
    ((37,), 45, 29, 16, "plain", False, True, False),
    ((37,), 45, 29, 5, None, False, False, False),
    ((3, 7), 45, 29, 16, None, False, True, False),
    ((2, 40), 150, 136, 130, "plain", True, True, True),  # more than one block in every dim of every product
    ((2,), 600, 520, 8, "plain", True, False, False),  # decode shape; split-K runs for fp32 buffers only
]


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-in{c[1]}-out{c[2]}-r{c[3]}-w{c[4]}-b{c[5]}-lb{c[6]}")
def test_matches_reference_float64(device, case, tol):
    lead, in_f, out_f, r, weight, bias, lora_bias, grad_base = case
    inputs = _inputs(lead, in_f, out_f, r, device=device, weight=weight, bias=bias, lora_bias=lora_bias,
                     grad_base=grad_base)
    y, _ = _compare(inputs, 0.37, tol[torch.float64])
    assert y.dtype == torch.float64


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight", ["plain", None])
@pytest.mark.parametrize("shape", [((3, 7), 45, 29, 5), ((2,), 600, 520, 8)], ids=["odd", "decode-splitk"])
def test_low_precision_against_float64(device, dtype, weight, shape, tol):
    lead, in_f, out_f, r = shape
    inputs = _inputs(lead, in_f, out_f, r, device=device, dtype=dtype, adapter_dtype=torch.float32, weight=weight,
                     lora_bias=True)
    y, grads = _compare(inputs, 2.0, tol[dtype])
    assert y.dtype == (dtype if weight else torch.float32)
    assert grads[0].dtype == dtype and all(g.dtype == torch.float32 for g in grads[1:])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_adapters_against_float64(device, dtype, tol):
    # Both operands in half precision: on a GPU this is the native tensor-core dot, not the fp32 one.
    inputs = _inputs((3, 7), 45, 29, 5, device=device, dtype=dtype, lora_bias=True, grad_base=True)
    y, grads = _compare(inputs, 2.0, tol[dtype])
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)


def test_bias_without_weight_is_an_error():
    x, _, _, a, b, _ = _inputs((4,), 8, 6, 2, device="cpu")
    for fn in (lora_linear_reference, lora_linear_triton, lora_linear):
        with pytest.raises(ValueError):
            fn(x, None, torch.zeros(6, dtype=x.dtype), a, b, 1.0)


def _dropout_mask(shape, p, seed, device):
    """Our kernel's keep-multiplier for x of this shape: with A = B = I, s = 1 and no base, the op is drop(x)."""
    in_f = shape[-1]
    x = torch.randn(shape, dtype=torch.float64, device=device)
    eye = torch.eye(in_f, dtype=torch.float64, device=device)
    torch.manual_seed(seed)
    dropped = lora_linear_triton(x, None, None, eye, eye, 1.0, p)
    return dropped / x


@pytest.mark.triton
def test_dropout_mask_statistics(device):
    p = 0.3
    mask = _dropout_mask((37, 24), p, seed=1, device=device)
    kept = mask != 0
    assert abs((~kept).double().mean().item() - p) < 0.08
    slots = [kept[:, j::4] for j in range(4)]  # one Philox call feeds 4 neighbours: all 4 outputs must be used
    assert all(not torch.equal(slots[0], other) for other in slots[1:])
    torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)), rtol=1e-12, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("weight", ["plain", None])
def test_dropout_same_mask_forward_and_backward(device, weight):
    p, seed, lead, in_f = 0.4, 1234, (3, 7), 24
    mask = _dropout_mask((*lead, in_f), p, seed, device)
    inputs = _inputs(lead, in_f, 29, 5, device=device, weight=weight, lora_bias=True, grad_base=True)
    torch.manual_seed(seed)
    y_t, g_t = _run(lora_linear_triton, inputs, 0.5, p)

    def masked(x, w, b, a, bb, s, _p, lb):
        return lora_linear_masked_reference(x, w, b, a, bb, s, mask, lb)

    y_r, g_r = _run(masked, inputs, 0.5)
    _assert_close(y_t, y_r, 1e-10, "forward")
    for i, (gt, gr) in enumerate(zip(g_t, g_r)):
        _assert_close(gt, gr, 1e-10, f"grad {i}")


def _strided(device, layout, in_f=24, out_f=29, r=5):
    """Operands as the prepared launches must read them in place or copy: x whose leading dims do not collapse
    (a transposed batch) or whose rows are padded (a column slice), adapters seen through .t()."""
    kw = dict(dtype=torch.float64, device=device)
    if layout == "batch-transposed":
        x = torch.randn(7, 3, in_f, **kw).transpose(0, 1)
    else:
        x = torch.randn(21, in_f + 3, **kw)[:, 2:in_f + 2]
    w = torch.randn(out_f, in_f, **kw) / in_f**0.5
    a = (torch.randn(in_f, r, **kw) / in_f**0.5).t()
    bb = torch.randn(r, out_f, **kw).t()
    return [t.detach().requires_grad_() for t in (x, w, torch.randn(out_f, **kw), a, bb, torch.randn(out_f, **kw))]


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["batch-transposed", "padded-rows"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_strided_operands_and_a_broadcast_gradient(device, layout, p):
    """Forward and backward (dy = ones broadcast from y.sum(), stride 0) against the reference with the kernel's own
    mask, which depends on x's logical index only."""
    x, w, b, a, bb, lb = inputs = _strided(device, layout)
    mask = _dropout_mask(x.shape, p, 11, device) if p else torch.ones_like(x)
    torch.manual_seed(11)
    y = lora_linear_triton(x, w, b, a, bb, 0.6, p, lb)
    got = torch.autograd.grad(y.sum(), inputs)
    want_y = lora_linear_masked_reference(x, w, b, a, bb, 0.6, mask, lb)
    want = torch.autograd.grad(want_y.sum(), inputs)
    _assert_close(y, want_y, 1e-10, "forward")
    for i, (g, wg) in enumerate(zip(got, want)):
        _assert_close(g, wg, 1e-10, f"grad {i}")


@pytest.mark.triton
def test_dropout_seeding(device):
    x, w, b, a, bb, lb = _inputs((5, 3), 32, 16, 4, device=device)

    def run(seed):
        torch.manual_seed(seed)
        return lora_linear_triton(x, w, b, a, bb, 1.0, 0.5, lb)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


@pytest.mark.triton
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_gradcheck(device, dropout_p):
    inputs = _inputs((3,), 6, 5, 2, device=device, lora_bias=True, grad_base=True)

    def fn(x, w, b, a, bb, lb):
        torch.manual_seed(0)  # the same dropout mask on every call, so the function is deterministic
        return lora_linear_triton(x, w, b, a, bb, 0.8, dropout_p, lb)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.triton
def test_torch_compile_fullgraph(device):
    inputs = _inputs((3, 7), 45, 29, 5, device=device, lora_bias=True, grad_base=True)

    def fn(x, w, b, a, bb, lb):
        return lora_linear_triton(x, w, b, a, bb, 0.5, 0.3, lb)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = _leaves(*inputs)
    torch.manual_seed(3)
    y_e = fn(*inputs)
    g_e = torch.autograd.grad(y_e.square().sum(), leaves)
    torch.manual_seed(3)
    y_c = compiled(*inputs)
    g_c = torch.autograd.grad(y_c.square().sum(), leaves)
    torch.testing.assert_close(y_c, y_e, rtol=1e-12, atol=1e-12)
    for gc, ge in zip(g_c, g_e):
        torch.testing.assert_close(gc, ge, rtol=1e-12, atol=1e-12)


@pytest.mark.triton
def test_dispatch(monkeypatch):
    inputs = _inputs((4, 3), 16, 8, 4, device="cpu", lora_bias=True)
    torch.manual_seed(5)
    want = lora_linear_reference(*inputs[:5], 0.5, 0.2, inputs[5])
    use_settings(monkeypatch, backend="torch")
    torch.manual_seed(5)
    assert torch.equal(lora_linear(*inputs[:5], 0.5, 0.2, inputs[5]), want)
    if interpreting():
        use_settings(monkeypatch, backend="triton")
        got = lora_linear(*inputs[:5], 0.5, 0.0, inputs[5])
        assert torch.equal(got, lora_linear_triton(*inputs[:5], 0.5, 0.0, inputs[5]))
        _assert_close(got, lora_linear_reference(*inputs[:5], 0.5, 0.0, inputs[5]), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_reference_is_peft_bit_for_bit(dtype, dropout):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 20)).to(dtype)
    cfg = peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=12, lora_dropout=dropout, lora_bias=True)
    model = peft.get_peft_model(model, cfg)
    layer = model.base_model.model[0]
    a, b, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    with torch.no_grad():
        b.normal_()
        lb.normal_()
    assert a.dtype == torch.float32  # PEFT keeps adapters in fp32 over a bf16 base
    model.train()
    x = torch.randn(2, 5, 24, dtype=dtype)
    torch.manual_seed(11)
    want = model(x)
    torch.manual_seed(11)
    got = lora_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias, a, b,
                                layer.scaling["default"], dropout, lb)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.triton
def test_autocast_matches_the_reference(device):
    """Under autocast the base operands are cast as autocast would (the op is opaque to it); backward works."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 40, device=device, requires_grad=True)
    w, b = torch.randn(24, 40, device=device), torch.randn(24, device=device)
    a = torch.randn(8, 40, device=device, requires_grad=True)
    bb = torch.randn(24, 8, device=device, requires_grad=True)
    results = []
    for fn in (lora_linear_triton, lora_linear_reference):
        with torch.autocast(device, dtype=torch.bfloat16):
            y = fn(x, w, b, a, bb, 0.5)
        assert y.dtype == torch.bfloat16
        grads = torch.autograd.grad(y.float().pow(2).sum(), (x, a, bb))
        results.append((y.float(), *grads))
    for got, want in zip(*results):
        assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.triton
def test_a_bf16_adapter_gradient_over_cancelling_tokens(device, tol):
    """dA = dzᵀ·x over 600 tokens into a bf16 lora_A gradient, half the tokens cancelling the other half: partial
    sums over K are ~300x the result. Summed in float32 and rounded once, dA is good to bf16 precision; partial sums
    rounded to bf16 (split-K into a 16-bit buffer) would not be. (Under the CPU interpreter such a split fails
    outright: no bf16 atomics.)"""
    g = torch.Generator().manual_seed(4)
    m, in_f, out_f, r = 600, 64, 24, 8
    v = torch.randn(in_f, generator=g, dtype=torch.float64)
    sign = torch.ones(m, 1, dtype=torch.float64)
    sign[m // 2:] = -1
    x = (sign * v + 0.05 * torch.randn(m, in_f, generator=g, dtype=torch.float64)).to(torch.bfloat16).to(device)
    a = (torch.randn(r, in_f, generator=g, dtype=torch.float64) / 8).to(torch.bfloat16).to(device)
    b = (torch.randn(out_f, r, generator=g, dtype=torch.float64) / 3).to(torch.bfloat16).to(device)
    dy = torch.randn(1, out_f, generator=g, dtype=torch.float64).expand(m, out_f).to(device)
    a_t = a.clone().requires_grad_()
    y = lora_linear_triton(x, None, None, a_t, b, 0.5)
    (got,) = torch.autograd.grad(y, a_t, dy.to(y.dtype))
    a64 = a.double().requires_grad_()
    (want,) = torch.autograd.grad(lora_linear_reference(x.double(), None, None, a64, b.double(), 0.5), a64, dy)
    assert got.dtype == torch.bfloat16
    err = (got.double() - want).abs().max().item()
    assert err <= tol[torch.bfloat16] * want.abs().max().item(), err
