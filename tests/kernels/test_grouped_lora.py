"""kernels/grouped_lora.py: the mixture-of-experts LoRA delta, forward and backward, against the per-expert
reference."""
import pytest
import torch

from peft_fast.kernels import experts_meta, grouped_lora, grouped_lora_reference, grouped_lora_torch, \
    grouped_lora_triton


def _problem(N, in_f, out_f, r, E, *, device, dtype=torch.float64, sentinels=0, seed=0, sort=True):
    """Rows routed to random experts (some experts get none), PEFT's strided B layout, sentinel ids >= E last."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E - 1, (N - sentinels,), generator=g)  # expert E-1 gets no rows
    ids = torch.cat([ids, torch.full((sentinels,), E + 3)])
    if sort:
        ids = torch.sort(ids).values
    x = torch.randn(N, in_f, generator=g, dtype=torch.float64)
    a = torch.randn(r * E, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5  # PEFT's lora_A [r·E, in]
    b = torch.randn(out_f, r * E, generator=g, dtype=torch.float64) / r ** 0.5  # PEFT's lora_B [out, r·E]
    cast = dict(device=device, dtype=dtype)
    x, a, b = x.to(**cast).requires_grad_(), a.to(**cast).requires_grad_(), b.to(**cast).requires_grad_()
    return x, a, b, experts_meta(ids.to(device), E)


def _factors(a, b, r, E):
    return a.view(E, r, -1), b.view(b.shape[0], r, E).permute(2, 0, 1)


def _peft_delta(x, a, b, r, E, scaling, ids):
    """PEFT's ParamWrapper math: expert e's weight delta B_e·A_e · s applied to its rows."""
    a3, b3 = _factors(a, b, r, E)
    out = torch.zeros(x.shape[0], b.shape[0], dtype=x.dtype)
    for t, e in enumerate(ids.tolist()):
        if 0 <= e < E:
            out[t] = (b3[e] @ a3[e] * scaling) @ x[t]
    return out


def _grads(fn, x, a, b, r, E, seed=1):
    for t in (x, a, b):
        t.grad = None
    out = fn(x, *_factors(a, b, r, E))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    (out * w).sum().backward()
    return out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max err {err:.3e} vs max |ref| {scale:.3e}"


def test_reference_is_peft_per_expert_math():
    x, a, b, meta = _problem(23, 12, 10, 3, 5, device="cpu", sentinels=2)
    ids = meta.token_slots.long()
    got = grouped_lora_reference(x, *_factors(a, b, 3, 5), 0.7, meta)
    _close(got, _peft_delta(x.detach(), a.detach(), b.detach(), 3, 5, 0.7, ids), 1e-12, "reference")
    assert torch.equal(got[-2:], torch.zeros_like(got[-2:]))  # sentinel rows: no expert here


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(37, 24, 20, 4, 6, 0), (50, 33, 17, 3, 3, 3), (5, 16, 16, 8, 8, 1)])
@pytest.mark.parametrize("sort", [True, False])
def test_triton_forward_and_backward_match_reference(device, shape, sort, tol):
    N, in_f, out_f, r, E, sentinels = shape
    x, a, b, meta = _problem(N, in_f, out_f, r, E, device=device, sentinels=sentinels, sort=sort)
    s = 1.7
    want = _grads(lambda x_, a3, b3: grouped_lora_reference(x_, a3, b3, s, meta), x, a, b, r, E)
    got = _grads(lambda x_, a3, b3: grouped_lora_triton(x_, a3, b3, s, meta), x, a, b, r, E)
    for g, w, what in zip(got, want, ("delta", "dx", "dA", "dB")):
        _close(g, w, tol[torch.float64], what)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_low_precision(device, dtype, tol):
    N, in_f, out_f, r, E = 40, 32, 48, 4, 4
    x, a, b, meta = _problem(N, in_f, out_f, r, E, device=device, dtype=dtype)
    ref = [t.detach().double().requires_grad_() for t in (x, a, b)]
    want = _grads(lambda x_, a3, b3: grouped_lora_reference(x_, a3, b3, 0.5, meta), *ref, r, E)
    got = _grads(lambda x_, a3, b3: grouped_lora_triton(x_, a3, b3, 0.5, meta), x, a, b, r, E)
    for g, w, what in zip(got, want, ("delta", "dx", "dA", "dB")):
        _close(g, w, tol[dtype] * 2, f"{dtype} {what}")


def test_torch_grouped_path_matches_reference():
    """The CPU path for float32 (torch's grouped matmul): same values and gradients, no loop over experts."""
    N, in_f, out_f, r, E = 41, 20, 12, 3, 5
    x, a, b, meta = _problem(N, in_f, out_f, r, E, device="cpu", dtype=torch.float32, sentinels=2)
    want = _grads(lambda x_, a3, b3: grouped_lora_reference(x_, a3, b3, 2.0, meta), x, a, b, r, E)
    got = _grads(lambda x_, a3, b3: grouped_lora_torch(x_, a3, b3, 2.0, meta), x, a, b, r, E)
    for g, w, what in zip(got, want, ("delta", "dx", "dA", "dB")):
        _close(g, w, 1e-5, what)


def test_dispatch_and_argument_errors():
    x, a, b, meta = _problem(9, 8, 6, 2, 3, device="cpu")
    a3, b3 = _factors(a, b, 2, 3)
    ref = grouped_lora_reference(x, a3, b3, 1.0, meta)
    _close(grouped_lora(x, a3, b3, 1.0, meta, rows_sorted=True), ref, 1e-12, "dispatch")
    with pytest.raises(ValueError, match="do not fit together"):
        grouped_lora_reference(x[:, :5], a3, b3, 1.0, meta)
    with pytest.raises(ValueError, match="groups 9 rows into 3 experts"):
        grouped_lora_reference(x[:4], a3, b3, 1.0, meta)


@pytest.mark.triton
def test_backward_with_strided_x(device, tol):
    """x seen through a transpose (column-major) or a column slice: dA's weight-gradient kernel honours x's column
    stride, as the forward's shrink does."""
    g = torch.Generator().manual_seed(3)
    n, in_f, out_f, r, e = 37, 24, 20, 4, 5
    meta = experts_meta(torch.randint(0, e, (n,), generator=g).to(device), e)
    kw = dict(dtype=torch.float64, generator=g)
    a3 = (torch.randn(e, r, in_f, **kw) / in_f**0.5).to(device)
    b3 = torch.randn(e, out_f, r, **kw).to(device)
    gy = torch.randn(n, out_f, **kw).to(device)
    layouts = {"column-major": torch.randn(in_f, n, **kw).to(device).t(),
               "every-other-column": torch.randn(n, 2 * in_f, **kw).to(device)[:, ::2]}
    for name, x in layouts.items():
        assert x.stride(1) != 1
        results = []
        for fn in (grouped_lora_triton, grouped_lora_reference):
            leaves = [x.detach().requires_grad_(), a3.clone().requires_grad_(), b3.clone().requires_grad_()]
            out = fn(*leaves, 1.3, meta)
            results.append((out, *torch.autograd.grad(out, leaves, gy)))
        for got, want, what in zip(*results, ("delta", "dx", "dA", "dB")):
            _close(got, want, tol[torch.float64], f"{name} {what}")
