"""kernels/common/lora_launches.py: the prepared launches of the fused ops' LoRA side, cached per signature. Calls that
share shapes but differ in anything else the plan fixes (scaling, biases, layouts, dtypes, the gradients wanted, the
global switches) must each get their own plan: every case runs after the others at the same shapes, in one process,
against the reference in float64."""
import importlib

import pytest
import torch
from torch_ops import TorchOps

from peft_fast.kernels import (dora_linear_reference, dora_linear_triton, lora_linear_reference, lora_linear_triton,
                               nf4_quantize, qlora_linear_reference, qlora_linear_triton)

lora_mm = importlib.import_module("peft_fast.kernels.common.lora_mm")

LEAD, IN, OUT, R = (3, 5), 24, 20, 4


def _leaves(device, dtype=torch.float64, adapter_dtype=torch.float64, *, a_layout="plain", lora_bias="plain",
            trains=("x", "a", "b", "lb"), lead=LEAD, r=R, in_f=IN):
    g = torch.Generator().manual_seed(1)
    t = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dt)  # noqa
    x, w, bias = t(*lead, in_f), t(OUT, in_f) / in_f**0.5, t(OUT)
    a = (t(r, in_f, dt=adapter_dtype) if a_layout == "plain" else t(in_f, r, dt=adapter_dtype).t()) / in_f**0.5
    b = t(OUT, r, dt=adapter_dtype)
    lb = {"plain": t(OUT, dt=adapter_dtype), "strided": t(2 * OUT, dt=adapter_dtype)[::2], None: None}[lora_bias]
    named = dict(x=x, w=w, bias=bias, a=a, b=b, lb=lb)
    return {k: None if v is None else v.detach().requires_grad_(k in trains) for k, v in named.items()}


def _check(leaves, scaling=0.7, p=0.0, dy="plain", tol=1e-10):
    """Output and every wanted gradient of lora_linear_triton against the reference in float64."""
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    y = lora_linear_triton(*[leaves[k] for k in ("x", "w", "bias", "a", "b")], scaling, p, leaves["lb"])
    gy = torch.ones_like(y) if dy == "plain" else torch.ones((), device=y.device, dtype=y.dtype).expand(y.shape)
    got = torch.autograd.grad(y, [leaves[k] for k in names], gy)
    ref = {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad) for k, v in leaves.items()}
    y_ref = lora_linear_reference(*[ref[k] for k in ("x", "w", "bias", "a", "b")], scaling, p, ref["lb"])
    want = torch.autograd.grad(y_ref, [ref[k] for k in names], gy.double())
    for name, g, w in zip(["y", *names], (y, *got), (y_ref, *want)):
        assert g.shape == w.shape, name
        err = (g.double() - w).abs().max().item()
        assert err <= tol * max(w.abs().max().item(), 1e-30), f"{name}: {err:.2e}"


@pytest.mark.triton
def test_one_shape_many_signatures(device):
    """Each call differs from the one before in one thing the plan fixes; a plan keyed without it would replay the
    other call's arguments."""
    _check(_leaves(device))
    _check(_leaves(device), scaling=2.0)
    _check(_leaves(device, lora_bias=None))
    _check(_leaves(device, lora_bias="strided"))  # a non-contiguous lora bias is made contiguous for the kernel
    _check(_leaves(device, a_layout="transposed"))
    _check(_leaves(device), dy="broadcast")
    _check(_leaves(device, torch.float32, torch.float32), tol=1e-5)
    _check(_leaves(device, torch.bfloat16, torch.float32), tol=2e-2)


@pytest.mark.triton
@pytest.mark.parametrize("trains", [("x",), ("a",), ("b",), ("lb",), ("w",), ("bias",), ("x", "w"), ("a", "b")])
def test_each_gradient_alone(device, trains):
    """Which gradients are wanted changes the backward's launches (dB alone, dz alone, dA alone, dx alone); run after
    the other cases at the same shapes."""
    _check(_leaves(device, trains=trains))


@pytest.fixture
def splits(monkeypatch) -> list:
    """SPLIT_K of every LoRA matmul launch, in order."""
    seen = []
    real = lora_mm.launch

    def spy(fn, grid, *args, **consts):
        seen.append(consts.get("SPLIT_K", 1))
        real(fn, grid, *args, **consts)

    monkeypatch.setattr(lora_mm, "launch", spy)
    return seen


@pytest.mark.triton
def test_split_k_products(device, splits):
    """Float32 buffers with a long K split it across programs and add atomically: dA's and dB's K is the token count
    (split when each runs alone), the forward expand's is the rank (never split: it adds into the base output). The
    spy checks that the launches themselves split (results alone are the same either way)."""
    # forward shrink and expand, then backward: dB alone, dA alone (after dz), or dB beside dz and dA beside dx
    for trains, last_splits in ((("b",), True), (("a",), True), (("x", "a", "b"), False)):
        splits.clear()
        _check(_leaves(device, torch.float32, torch.float32, trains=trains, lead=(640,)), tol=1e-5)
        assert (splits[-1] > 1) == last_splits, (trains, splits)
    expand = lora_mm.mm_config(4, OUT, 512, torch.float32, torch.float32, torch.float32, torch.device(device), True,
                               *lora_mm.state())
    assert expand.split > 1  # so only the plan's accumulate rule keeps the expand whole (without a lora bias)
    splits.clear()
    _check(_leaves(device, torch.float32, torch.float32, lead=(4,), r=512, lora_bias=None), tol=1e-5)
    assert splits[1] == 1, splits  # the forward's expand


@pytest.mark.triton
def test_deterministic_mode_never_splits(device, splits):
    """Split-K adds partial sums atomically, in any order: deterministic mode must get a plan without it, even after a
    call at the same shapes made one with it."""
    cases = [dict(trains=("b",), lead=(640,)),  # backward: dB alone splits over the tokens
             dict(trains=("a",), lead=(4,), in_f=640, lora_bias=None)]  # forward: the shrink splits over in
    for case in cases:
        splits.clear()
        _check(_leaves(device, torch.float32, torch.float32, **case), tol=1e-5)
        assert max(splits) > 1, case
        splits.clear()
        try:
            torch.use_deterministic_algorithms(True)
            _check(_leaves(device, torch.float32, torch.float32, **case), tol=1e-5)
        finally:
            torch.use_deterministic_algorithms(False)
        assert splits and set(splits) == {1}, case


@pytest.mark.triton
def test_z_and_dz_stay_float32_for_16_bit_adapters(device):
    """z (kept for dB) and dz = s·dy·B accumulate in float32 whatever the adapters' dtype."""
    leaves = _leaves(device, torch.bfloat16, torch.bfloat16)
    with TorchOps() as mode:
        y = lora_linear_triton(*[leaves[k] for k in ("x", "w", "bias", "a", "b")], 0.7, 0.0, leaves["lb"])
        y.backward(torch.ones_like(y))
    rows = LEAD[0] * LEAD[1]
    zs = [dtype for name, shape, dtype in mode.made
          if name == "aten.empty.memory_format" and shape in ((*LEAD, R), (rows, R))]
    assert len(zs) == 2 and set(zs) == {torch.float32}, mode.made


@pytest.mark.triton
def test_dora_without_tokens(device):
    """No rows: DoRA's backward loops over no blocks and must still return zero (not missing) adapter gradients."""
    x = torch.randn(0, IN, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(OUT, IN, device=device, dtype=torch.float64)
    a = torch.randn(R, IN, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(OUT, R, device=device, dtype=torch.float64, requires_grad=True)
    c = torch.rand(OUT, device=device, dtype=torch.float64).add(0.5).requires_grad_()
    y = dora_linear_triton(None, x, None, a, b, 0.7, c, w)
    da, db, dc = torch.autograd.grad(y.sum(), [a, b, c])
    assert y.shape == (0, OUT) and not da.any() and not db.any() and not dc.any()


@pytest.mark.triton
def test_dora_shrink_reads_x_in_place_or_copied(device):
    """DoRA's shrink alone (its expand is its own): x with padded rows, then contiguous, at the same shapes (more
    rows than a decode, which runs its one-launch path instead)."""
    w = torch.randn(OUT, IN, device=device, dtype=torch.float64) / IN**0.5
    a = torch.randn(R, IN, device=device, dtype=torch.float64) / IN**0.5
    b = torch.randn(OUT, R, device=device, dtype=torch.float64)
    c = torch.rand(OUT, device=device, dtype=torch.float64) + 0.5
    for x in (torch.randn(40, IN + 3, device=device, dtype=torch.float64)[:, 1:IN + 1],
              torch.randn(40, IN, device=device, dtype=torch.float64)):
        got = dora_linear_triton(None, x, None, a, b, 0.7, c, w)
        torch.testing.assert_close(got, dora_linear_reference(None, x, None, a, b, 0.7, c, w), rtol=1e-10, atol=0)


def _qlora(device, x_shape, trains):
    g = torch.Generator().manual_seed(2)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device)  # noqa: E731
    packed, state = nf4_quantize(t(OUT, 64) / 8, blocksize=64)
    named = dict(x=t(*x_shape), bias=t(OUT), a=t(R, 64) / 8, b=t(OUT, R), lb=t(OUT))
    named = {k: v.requires_grad_(k in trains) for k, v in named.items()}
    outs = []
    for fn in (qlora_linear_triton, qlora_linear_reference):
        y = fn(named["x"], packed, state, named["bias"], named["a"], named["b"], 0.7, 0.0, named["lb"])
        wanted = [v for v in named.values() if v.requires_grad]
        outs.append((y, torch.autograd.grad(y, wanted, torch.ones_like(y))))
    return outs


@pytest.mark.triton
@pytest.mark.parametrize("trains", [("x",), ("a",), ("b",), ("lb",), ("bias",), ("x", "a", "b", "lb", "bias")])
@pytest.mark.parametrize("x_shape", [(64,), (3, 64)], ids=["1-D", "2-D"])
def test_qlora_each_gradient_alone_and_a_1d_input(device, trains, x_shape):
    (y, got), (y_ref, want) = _qlora(device, x_shape, trains)
    assert y.shape == y_ref.shape == (*x_shape[:-1], OUT)
    for g, w in zip((y, *got), (y_ref, *want)):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
