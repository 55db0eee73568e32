"""kernels/dora_linear.py: the fused DoRA epilogue (Triton, interpreter or GPU) against the reference (PEFT's order)
in float64, forward and backward, odd shapes, strides, with and without bias, and the eager in-place path."""
import pytest
import torch
import torch.nn.functional as F
from dora_inputs import dora_inputs as _inputs

from peft_fast.kernels import dora_linear, dora_linear_reference, dora_linear_triton


def _run(fn, x, w, bias, a, b, m, norm, s, gy, mode="base"):
    """mode "base": the caller's base output goes in; "weight": the op runs the base matmul (w trainable here)."""
    c = m / norm
    if mode == "base":
        y = fn(F.linear(x, w), x, bias, a, b, s, c)
    else:
        w = w.detach().requires_grad_()
        y = fn(None, x, bias, a, b, s, c, weight=w)
    leaves = [t for t in (x, a, b, m, bias) if t is not None] + ([w] if mode == "weight" else [])
    return y, torch.autograd.grad(y, leaves, gy)


@pytest.mark.triton
@pytest.mark.parametrize("lead,in_f,out_f,r", [((1,), 1, 1, 1), ((7,), 33, 20, 3), ((2, 5), 64, 130, 16),
                                               ((3, 17), 100, 70, 70), ((65,), 48, 16, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["base", "weight"])
def test_triton_matches_reference_float64(device, lead, in_f, out_f, r, bias, mode):
    x, w, bvec, a, b, m, norm = _inputs(lead, in_f, out_f, r, device, bias=bias)
    gy = torch.randn(*lead, out_f, dtype=torch.float64, device=device)
    y_ref, g_ref = _run(dora_linear_reference, x, w, bvec, a, b, m, norm, 1.7, gy, mode)
    y, g = _run(dora_linear_triton, x, w, bvec, a, b, m, norm, 1.7, gy, mode)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        assert want.abs().sum() > 0


@pytest.mark.triton
def test_strided_inputs(device):
    x, w, bvec, a, b, m, norm = _inputs((4, 6), 40, 24, 5, device)
    a_t = a.detach().T.contiguous().T.requires_grad_()  # a transposed storage
    b_t = b.detach().T.contiguous().T.requires_grad_()
    assert not a_t.is_contiguous() and not b_t.is_contiguous()
    x_s = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    gy = torch.randn(4, 6, 24, dtype=torch.float64, device=device)
    y_ref, g_ref = _run(dora_linear_reference, x, w, bvec, a, b, m, norm, 0.5, gy)
    y, g = _run(dora_linear_triton, x_s, w, bvec, a_t, b_t, m, norm, 0.5, gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.triton
def test_eager_inference_is_in_place_and_exact(device):
    x, w, bvec, a, b, m, norm = _inputs((9,), 32, 48, 4, device)
    with torch.no_grad():
        base = F.linear(x, w)
        ptr = base.data_ptr()
        want = dora_linear_reference(base.clone(), x, bvec, a, b, 2.0, m / norm)
        y = dora_linear_triton(base, x, bvec, a, b, 2.0, m / norm, overwrite_base=True)
    assert y.data_ptr() == ptr  # the caller's base buffer, handed over, became y
    torch.testing.assert_close(y, want, rtol=1e-11, atol=1e-11)
    with torch.no_grad():
        torch.testing.assert_close(dora_linear_triton(None, x, bvec, a, b, 2.0, m / norm, weight=w), want,
                                   rtol=1e-11, atol=1e-11)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(device, dtype):
    x, w, bvec, a, b, m, norm = _inputs((2, 8), 64, 32, 8, device, dtype=torch.float64)
    xs, ws, bs = x.detach().to(dtype), w.to(dtype), bvec.detach().to(dtype)
    a32, b32, m32, n32 = a.detach().float(), b.detach().float(), m.detach().float(), norm.float()
    with torch.no_grad():
        got = dora_linear_triton(F.linear(xs, ws), xs, bs, a32, b32, 1.5, m32 / n32)
        # The truth: the same (rounded) inputs in float64. bf16 is judged relative to the output's scale: on a GPU
        # the LoRA dots run on bf16 tensor cores, and single elements near 0 cancel (seen: 3 ulps, 33% relative).
        d = torch.float64
        want = dora_linear_reference(F.linear(xs.to(d), ws.to(d)), xs.to(d), bs.to(d), a32.to(d), b32.to(d), 1.5,
                                     (m32 / n32).to(d))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"max error {err:.3e} vs max |y| {want.abs().max().item():.3e}"


@pytest.mark.triton
def test_zero_magnitude_channels_stay_finite(device):
    """A channel with m = 0 has lost t in y: its magnitude gradient is 0 there (documented), the rest exact."""
    x, w, bvec, a, b, m, norm = _inputs((5,), 16, 12, 2, device, zero_c=True)
    gy = torch.randn(5, 12, dtype=torch.float64, device=device)
    _, g_ref = _run(dora_linear_reference, x, w, bvec, a, b, m, norm, 1.0, gy)
    _, g = _run(dora_linear_triton, x, w, bvec, a, b, m, norm, 1.0, gy)
    dm, dm_ref = g[3], g_ref[3]
    zero = m.detach() == 0
    assert torch.isfinite(dm).all() and (dm[zero] == 0).all()
    torch.testing.assert_close(dm[~zero], dm_ref[~zero], rtol=1e-9, atol=1e-10)
    for got, want in zip(g[:3], g_ref[:3]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_dispatch_reference_on_cpu_and_errors():
    x, w, bvec, a, b, m, norm = _inputs((3,), 8, 6, 2, "cpu")
    with torch.no_grad():
        y = dora_linear(F.linear(x, w), x, bvec, a, b, 1.0, m / norm)
        c = (m / norm)
        want = c * (F.linear(x, w) + F.linear(F.linear(x, a), b)) + bvec
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="exactly one"):
        dora_linear(F.linear(x, w), x, bvec, a, b, 1.0, m / norm, weight=w)
    with pytest.raises(ValueError, match="mag_scale"):
        dora_linear(F.linear(x, w), x, bvec, a, b, 1.0, torch.ones(5, dtype=torch.float64))


@pytest.mark.triton
def test_torch_compile_traces_without_graph_breaks(device):
    x, w, bvec, a, b, m, norm = _inputs((2, 3), 32, 16, 4, device)
    gy = torch.randn(2, 3, 16, dtype=torch.float64, device=device)

    def f(x, a, b, m, bias):
        return dora_linear_triton(F.linear(x, w), x, bias, a, b, 1.25, m / norm)

    def f_w(x, a, b, m, bias):
        return dora_linear_triton(None, x, bias, a, b, 1.25, m / norm, weight=w)

    y_ref, g_ref = _run(dora_linear_reference, x, w, bvec, a, b, m, norm, 1.25, gy)
    for fn in (f, f_w):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        y = compiled(x, a, b, m, bvec)
        g = torch.autograd.grad(y, (x, a, b, m, bvec), gy)
        torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
        for got, want in zip(g, g_ref):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.triton
def test_deterministic_mode_gives_the_same_gradients(device):
    x, w, bvec, a, b, m, norm = _inputs((33,), 24, 40, 4, device)
    gy = torch.randn(33, 40, dtype=torch.float64, device=device)
    _, g = _run(dora_linear_triton, x, w, bvec, a, b, m, norm, 0.9, gy)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _, g_det = _run(dora_linear_triton, x, w, bvec, a, b, m, norm, 0.9, gy)
    finally:
        torch.use_deterministic_algorithms(False)
    for got, want in zip(g_det, g):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_in_row_blocks(device, monkeypatch, deterministic):
    """The dense path's backward walks the tokens in blocks (dt one block at a time): 7-row blocks over 45 tokens."""
    import sys

    mod = sys.modules["peft_fast.kernels.dora_linear"]  # the package exports a function of the same name
    monkeypatch.setattr(mod, "BWD_BLOCK_ROWS", 7)
    monkeypatch.setattr(mod, "BWD_BLOCK_BYTES", 0)
    x, w, bvec, a, b, m, norm = _inputs((5, 9), 24, 40, 6, device)
    gy = torch.randn(5, 9, 40, dtype=torch.float64, device=device)
    _, g_ref = _run(dora_linear_reference, x, w, bvec, a, b, m, norm, 0.7, gy, "weight")
    # deterministic: the magnitude's gradient summed by torch over the blocks, not by the kernels' atomics
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        _, g = _run(dora_linear_triton, x, w.detach(), bvec, a, b, m, norm, 0.7, gy, "weight")
        for got, want in zip(g, g_ref):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)

        # a frozen weight (the usual case): dt is not kept, the blocks really run
        calls = []
        real = mod.dora_scale_grad
        monkeypatch.setattr(mod, "dora_scale_grad", lambda *args: calls.append(args[0].shape[0]) or real(*args))
        y = dora_linear_triton(None, x, bvec, a, b, 0.7, m / norm, weight=w)
        gx = torch.autograd.grad(y, (x, a, b, m, bvec), gy)
        assert calls == [7] * 6 + [3]
        for got, want in zip(gx, g_ref[:5]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        # blocks grow to BWD_BLOCK_BYTES of dt: 16 rows of 40 float64 channels
        monkeypatch.setattr(mod, "BWD_BLOCK_BYTES", 16 * 40 * 8)
        calls.clear()
        gx = torch.autograd.grad(dora_linear_triton(None, x, bvec, a, b, 0.7, m / norm, weight=w),
                                 (x, a, b, m, bvec), gy)
        assert calls == [16, 16, 13]
        for got, want in zip(gx, g_ref[:5]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    finally:
        torch.use_deterministic_algorithms(was)
