"""OFT's rotation: the parameters of one adapter (`OFTRotation`, PEFT's OFTRotationModule: the strict upper
triangles of `rows` skew-symmetric blocks) and the math on them.

- `rotation(module)`: the orthogonal blocks R [rows, b, b], PEFT's matrices (equal up to float rounding): Q =
  skew(weight), then the Cayley transform R = (I - Q)(I + Q)⁻¹, or its Neumann series.
- `project(module)`: COFT's constraint, each block within eps of the identity (PEFT rewrites the weight with it
  before every use).
- `rotate(x, R)`: x·diag(R) over the last dimension, block by block (never the block-diagonal matrix).
- `fold(w, R)`: w·diag(R)ᵀ for a weight w [out, in], so that x·diag(R)·wᵀ = x·fold(w, R)ᵀ; `inverse(R)`.
- `rotate_channels(x, R)`: the same for a 1x1 Conv2d's input, pixel by pixel (PEFT's 1x1 patches).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class OFTRotation(nn.Module):
    """One adapter of an OFT layer: `weight` [rows, b·(b-1)/2] (rows = 1 with block_share) and its settings."""

    def __init__(self, rows: int, block_size: int, in_features: int, config, kernel_size=(0, 0)):
        super().__init__()
        self.r = rows
        self.block_size = block_size
        self.in_features = in_features
        self.n_elements = block_size * (block_size - 1) // 2
        self.weight = nn.Parameter(torch.empty(rows, self.n_elements))
        self.coft, self.eps, self.block_share = config.coft, config.eps, config.block_share
        self.use_cayley_neumann = config.use_cayley_neumann
        self.num_cayley_neumann_terms = config.num_cayley_neumann_terms
        self.kernel_size = kernel_size
        rows_idx, cols_idx = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows_idx, persistent=False)
        self.register_buffer("cols", cols_idx, persistent=False)

    @property
    def blocks(self) -> int:
        """How many blocks the input is cut into (the one shared block repeats with block_share)."""
        return self.in_features // self.block_size if self.block_share else self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # PEFT's call on the module: rotate x (no cache)
        project(self)
        return rotate(x.to(self.weight.dtype), rotation(self))


def _skew_index(module: OFTRotation) -> torch.Tensor:
    """For each entry of a b x b block, where skew() finds it in [0, weight, -weight] (0 on the diagonal)."""
    b, device = module.block_size, module.rows.device
    key = (b, device)
    index = _SKEW_INDEX.get(key)
    if index is None:
        with torch.inference_mode(False):  # kept for every later call: never an inference tensor autograd refuses
            n = module.n_elements
            index = torch.zeros(b * b, dtype=torch.long, device=device)
            upper = torch.arange(1, n + 1, device=device)
            rows, cols = module.rows.clone(), module.cols.clone()  # (buffers made under inference_mode, maybe)
            index[rows * b + cols] = upper
            index[cols * b + rows] = upper + n
            index = _SKEW_INDEX[key] = index
    return index


_SKEW_INDEX: dict = {}


def skew(module: OFTRotation, vec: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric blocks Q [rows, b, b] holding `vec` above the diagonal: PEFT's values (it writes vec into
    zeros and subtracts the transpose, which is exact), gathered in one indexing op instead."""
    b = module.block_size
    ext = torch.cat([vec.new_zeros(vec.shape[0], 1), vec, -vec], dim=1)
    return ext[:, _skew_index(module)].view(vec.shape[0], b, b)


def _series(q: torch.Tensor, s: torch.Tensor, eye: torch.Tensor, m: int, c0: float) -> torch.Tensor:
    """c0·I + 2Q + 2Q² + ... + 2Q^(m-1) + Q^m, with S = Q²: c0·I + 2Q + S·(the same sum for m - 2, c0 = 2)."""
    if m == 1:
        return torch.add(q, eye, alpha=c0)
    if m == 2:
        return torch.add(s, q, alpha=2).add_(eye, alpha=c0)
    return torch.baddbmm(torch.add(eye, q, alpha=2) if c0 == 1 else torch.add(q, eye).mul_(2), s,
                         _series(q, s, eye, m - 2, 2.0))


def rotation(module: OFTRotation, weight: torch.Tensor | None = None) -> torch.Tensor:
    """R [rows, b, b] from `weight` (the module's own by default), in the weight's dtype.

    PEFT's Neumann series with n terms is I + 2Q + ... + 2Q^(m-1) + Q^m, m = max(3, n - 1) (n = 3 and 4 give the
    same, as in PEFT; n = 2: I + 2Q; n = 1: I). PEFT forms the powers one by one (m - 1 block products, forward and
    twice in backward); here Q² is formed once and the sum nested in it (1 + ⌊(m - 1) / 2⌋ products: 2 instead of
    3 for the default), equal up to float rounding."""
    weight = module.weight if weight is None else weight
    b, n = module.block_size, weight.shape[0]
    q = skew(module, weight)
    if module.use_cayley_neumann:
        eye = torch.eye(b, device=weight.device, dtype=weight.dtype)
        terms = module.num_cayley_neumann_terms
        if terms <= 2:
            r = (eye + 2 * q) if terms == 2 else eye.expand(n, b, b).clone()
        else:
            r = _series(q, torch.bmm(q, q), eye, max(3, terms - 1), 1.0)
    else:  # PEFT solves X·(I + Q) = I - Q; X = 2·(I + Q)⁻¹ - I is the same matrix, one batched inverse (cheaper)
        # in float32 at least, as PEFT's solve: torch has no 16-bit inverse
        eye = torch.eye(b, device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))
        r = 2 * torch.linalg.inv(eye + q) - eye
    return r.to(weight.dtype)


def projected(module: OFTRotation) -> torch.Tensor:
    """COFT: each block's skew matrix scaled back onto the ball of radius eps/√rows around zero when outside it."""
    q = skew(module, module.weight.detach())
    eps = module.eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    zero = torch.zeros((q.size(1), q.size(1)), device=q.device, dtype=q.dtype).unsqueeze(0).expand_as(q)
    diff = q - zero
    norm = torch.norm(q - zero, dim=(1, 2), keepdim=True)
    out = torch.where((norm <= eps).bool(), q, zero + eps * (diff / norm))
    return out[:, module.rows, module.cols]


def project(module: OFTRotation) -> None:
    """PEFT rewrites the weight with its projection before every use (forward and merge) when coft is on; an
    unchanged projection is not written (the weight's version, which caches key on, then stays)."""
    if not module.coft:
        return
    with torch.no_grad():
        new = projected(module)
        if not torch.equal(new, module.weight):
            module.weight.copy_(new)


def blocks_of(module: OFTRotation, r: torch.Tensor) -> torch.Tensor:
    """R for every block of the input: the shared block repeated (a view) with block_share."""
    return r.expand(module.blocks, -1, -1) if module.block_share else r


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x·diag(R) over x's last dimension (R [blocks, b, b], one block per slice of b features)."""
    shape = x.shape
    blocks, b = r.shape[0], r.shape[-1]
    y = torch.einsum("...rk,rkc->...rc", x.reshape(*shape[:-1], blocks, b), r)
    return y.reshape(shape)


def fold(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """w·diag(R)ᵀ for w [out, in]."""
    out, blocks, b = w.shape[0], r.shape[0], r.shape[-1]
    return torch.einsum("orc,rkc->ork", w.reshape(out, blocks, b), r).reshape(out, blocks * b)


def inverse(r: torch.Tensor) -> torch.Tensor:
    """diag(R)⁻¹ block by block (PEFT inverts the whole block-diagonal matrix: the same values, cubically dearer),
    in float32 at least, as PEFT inverts, then in R's dtype."""
    return torch.linalg.inv(r.float() if r.dtype != torch.float32 and r.dtype != torch.float64 else r).to(r.dtype)


def rotate_channels(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """PEFT's rotation of a 1x1 Conv2d's input x [N, C, H, W]: every pixel's channel vector (its 1x1 patch)."""
    return rotate(x.movedim(1, -1), r).movedim(-1, 1)


class FoldedLinear(torch.autograd.Function):
    """x·diag(R)·Wᵀ + bias with the rotation folded into the weight in forward (out·in·b, where rotating x costs
    tokens·in·b plus a copy of x), and the rotating path's backward: u' = dy·W, dx = u'·diag(R)ᵀ, dR from x and
    u' block by block (so no [out, in] gradient of the folded weight is formed). For a frozen W [out, in]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias):
        ctx.save_for_backward(x, r, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, fold(weight, r), bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        dy = dy.to(weight.dtype)  # under autocast the forward's linear ran in 16 bits, and dy comes in them
        du = dy @ weight
        dx = rotate(du, r.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dr = None
        if ctx.needs_input_grad[1]:
            blocks, b = r.shape[0], r.shape[-1]
            lead = x.shape[:-1]
            dr = torch.einsum("...rk,...rc->rkc", x.to(du.dtype).reshape(*lead, blocks, b),
                              du.reshape(*lead, blocks, b))
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, dr, None, dbias
