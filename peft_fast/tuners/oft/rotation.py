"""OFT's rotation: the parameters of one adapter (`OFTRotation`, PEFT's OFTRotationModule: the strict upper
triangles of `rows` skew-symmetric blocks) and the math on them.

- `rotation(module)`: the orthogonal blocks R [rows, b, b], PEFT's operations in PEFT's order (so the same values):
  Q = skew(weight), then the Cayley transform R = (I - Q)(I + Q)⁻¹, or its Neumann series
  I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1).
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


def skew(module: OFTRotation, vec: torch.Tensor) -> torch.Tensor:
    b = module.block_size
    matrix = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
    matrix[:, module.rows, module.cols] = vec
    return matrix - matrix.transpose(-2, -1)


def rotation(module: OFTRotation, weight: torch.Tensor | None = None) -> torch.Tensor:
    """R [rows, b, b] from `weight` (the module's own by default), in the weight's dtype."""
    weight = module.weight if weight is None else weight
    b, n = module.block_size, weight.shape[0]
    q = skew(module, weight)
    if module.use_cayley_neumann:
        r = torch.eye(b, device=weight.device, dtype=weight.dtype).repeat(n, 1, 1)
        terms = module.num_cayley_neumann_terms
        if terms > 1:
            r.add_(q, alpha=2.0)
            if terms > 2:
                power = torch.bmm(q, q)
                r.add_(power, alpha=2.0)
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, q)
                    r.add_(power, alpha=2.0)
                power = torch.bmm(power, q)
                r.add_(power)
    else:
        eye = torch.eye(b, device=weight.device).unsqueeze(0).expand(n, b, b)
        r = torch.linalg.solve(eye + q, eye - q, left=False)
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
