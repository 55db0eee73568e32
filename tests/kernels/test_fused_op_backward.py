"""The eager backward of the fused training ops (common/autograd.FusedOp): the outputs they keep for backward (z,
DoRA's v) are never differentiated, so autograd must not fill zero gradients for them. For DoRA with dropout that
would be a [tokens, out] buffer in every layer's backward, the size of an activation. A backward that reaches no
gradient of the output returns none either."""
import pytest
import torch
from dora_inputs import dora_inputs
from torch_ops import TorchOps

from peft_fast.kernels import dora_dropout_linear_triton, dora_linear_triton, lora_linear_triton

ZERO_FILLS = {"aten.zeros.default", "aten.zeros_like.default", "aten.new_zeros.default", "aten.zero_.default",
              "aten.fill_.Scalar"}


def _op(device, op):
    """(y, the leaves it was computed from) for one op on fresh float64 inputs."""
    x, w, bias, a, b, m, norm = dora_inputs((6,), 20, 12, 4, device)
    c = (m / norm).detach().requires_grad_()
    y = {
        "lora": lambda: lora_linear_triton(x, w, bias, a, b, 1.5, 0.0),
        "lora dropout": lambda: lora_linear_triton(x, w, bias, a, b, 1.5, 0.3),
        "dora": lambda: dora_linear_triton(None, x, bias, a, b, 1.5, c, w),
        "dora dropout": lambda: dora_dropout_linear_triton(x, w, bias, a, b, 1.5, c, 0.3),
    }[op]()
    return y, [x, bias, a, b] + ([c] if "dora" in op else [])


OPS = ["lora", "lora dropout", "dora", "dora dropout"]


@pytest.mark.triton
@pytest.mark.parametrize("op", OPS)
def test_no_zero_gradients_for_the_kept_outputs(device, op):
    y, _ = _op(device, op)
    with TorchOps() as mode:
        y.backward(torch.randn_like(y))
    fills = [shape for name, shape, _ in mode.made if name in ZERO_FILLS]
    # DoRA's backward zero-initializes its per-channel sum of dy ⊙ t ([out]); nothing [tokens, *] is filled
    assert all(len(shape) == 1 for shape in fills), fills


@pytest.mark.triton
@pytest.mark.parametrize("op", OPS)
def test_double_backward_is_refused(device, op):
    """create_graph=True would differentiate only the torch part of the backward (dy·W), silently dropping the
    kernels' part: the second backward raises instead."""
    y, leaves = _op(device, op)
    # y²: the upstream gradient records a graph; y·w: a constant one (a gradient penalty on a loss linear in y),
    # which torch's once_differentiable would let through with the kernels' second-order part silently missing
    for loss in (y.pow(2).sum(), (y * torch.randn_like(y)).sum()):
        grads = torch.autograd.grad(loss, leaves[0], create_graph=True, retain_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            grads[0].pow(2).sum().backward()


@pytest.mark.triton
@pytest.mark.parametrize("op", OPS)
def test_an_undefined_output_gradient_gives_none(device, op):
    """gradcheck's check_undefined_grad: the output reaches the loss through an undefined gradient."""
    y, leaves = _op(device, op)
    undefined = torch._C._functions.UndefinedGrad()(y)
    grads = torch.autograd.grad(undefined, leaves, torch.ones_like(y), allow_unused=True)
    assert all(g is None for g in grads)  # not zeros: the backward must not run on a materialized zero dy


@pytest.mark.triton
@pytest.mark.parametrize("op", ["lora", "lora dropout", "qlora"])
@pytest.mark.parametrize("lead", [(2, 3), (6,)])
def test_the_output_may_be_modified_in_place_as_a_native_ops(device, op, lead):
    """Models modify a layer's output in place (y.mul_(...)), which PEFT's native ops allow. The ops that do not keep
    their output for backward return a tensor of their own, not a view made inside the Function (which autograd
    would refuse to modify), also for [..., in] inputs with a bias; the gradients are the reference's."""
    from peft_fast.kernels import lora_linear_reference, nf4_quantize, qlora_linear_reference, qlora_linear_triton

    g = torch.Generator().manual_seed(3)
    x = torch.randn(*lead, 12, generator=g, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(10, generator=g, dtype=torch.float64).to(device)
    a = torch.randn(4, 12, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(10, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(10, 12, generator=g, dtype=torch.float64).to(device)
    if op == "qlora":
        packed, state = nf4_quantize(w.float(), blocksize=64)
        run = lambda f: f(x, packed, state, bias, a, b, 1.5, 0.0)  # noqa: E731
        fns = (qlora_linear_triton, qlora_linear_reference)
    else:
        p = 0.3 if op == "lora dropout" else 0.0
        run = lambda f: f(x, w, bias, a, b, 1.5, p)  # noqa: E731
        fns = (lora_linear_triton, lora_linear_reference)
    grads = []
    for fn in fns:
        torch.manual_seed(0)  # the same dropout draws for both: compared only without dropout below
        y = run(fn)
        y.mul_(2.0)
        grads.append(torch.autograd.grad(y.pow(2).sum(), (x, a, b)))
    if op != "lora dropout":
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
