"""Random inputs of a DoRA layer op (x, W, bias, A, B, magnitude, norm), shared by the DoRA kernel tests."""
import torch


def dora_inputs(lead, in_f, out_f, r, device, dtype=torch.float64, bias=True, zero_c=False, train_w=False):
    """x [*lead, in_f], W [out_f, in_f], bias, A [r, in_f], B [out_f, r], magnitude m and a row norm, drawn from a seed
    of the shapes; zero_c zeroes every third magnitude; train_w makes W require grad."""
    g = torch.Generator().manual_seed(in_f * 1000 + out_f * 10 + r)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    x = t(*lead, in_f).requires_grad_()
    w = (t(out_f, in_f) / in_f**0.5).requires_grad_(train_w)
    a = (t(r, in_f) / in_f**0.5).requires_grad_()
    b = t(out_f, r).requires_grad_()
    m = t(out_f).abs() + 0.5
    if zero_c:
        m[::3] = 0.0
    m.requires_grad_()
    norm = t(out_f).abs() + 0.5
    bvec = t(out_f).requires_grad_() if bias else None
    return x, w, bvec, a, b, m, norm
