"""kernels/common/lora_mm.py's two-matmul launch (prepare2/fire2, the LoRA backward's paired launches): equal to the
two `mm`s it replaces, dropout masks included."""
import pytest
import torch

from peft_fast.kernels.common import lora_mm
from peft_fast.kernels.common.lora_mm import DROP_B, DROP_C, DROP_NONE, mm


def mm2(first: tuple, second: tuple, *, seed=None, p: float = 0.0, ld_x: int = 0, rows_x: int = 0) -> None:
    """Two `mm`s, each (a, b, c, scale, accumulate, drop), in one launch, planned as lora_launches.py plans a pair:
    no bias, no split-K, one dropout mask (x's) for both."""
    one, two = (lora_mm._plan(a, b, c, scale, acc, False, drop, p, ld_x, rows_x, False)
                for a, b, c, scale, acc, drop in (first, second))
    lora_mm.fire2(lora_mm.prepare2(one, two), first[:3], second[:3], seed)


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("accumulate", [False, True])
def test_mm2_is_the_two_mms(device, dtype, p, accumulate, tol):
    """The LoRA backward's second launch: dA = dzᵀ·drop(x) beside dx (+)= drop-mask ⊙ dz·A, odd sizes, strided."""
    M, in_f, r = 37, 45, 5
    dz = _rand(M, r, dtype=dtype, seed=0).to(device)
    x = _rand(M, in_f, dtype=dtype, seed=1).to(device)
    a = _rand(in_f, r, dtype=dtype, seed=2).to(device).t()  # [r, in], transposed strides
    dx0 = _rand(M, in_f, dtype=dtype, seed=3).to(device)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    mask = dict(seed=seed, p=p, ld_x=in_f, rows_x=M)
    drop_b, drop_c = (DROP_B, DROP_C) if p else (DROP_NONE, DROP_NONE)
    want_da, want_dx = torch.empty(r, in_f, dtype=dtype, device=device), dx0.clone()
    mm(dz.t(), x, want_da, drop=drop_b, **mask)
    mm(dz, a, want_dx, accumulate=accumulate, drop=drop_c, **mask)
    da, dx = torch.empty(r, in_f, dtype=dtype, device=device), dx0.clone()
    mm2((dz.t(), x, da, 1.0, False, drop_b), (dz, a, dx, 1.0, accumulate, drop_c), **mask)
    for got, want in ((da, want_da), (dx, want_dx)):
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol[dtype] * max(want.double().abs().max().item(), 1e-30)


@pytest.mark.triton
def test_mm2_with_an_empty_product_launches_the_other_alone(device, monkeypatch):
    calls = []
    real = lora_mm._lora_mm_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(lora_mm, "_lora_mm_kernel", Spy())
    a, b = torch.randn(6, 4, device=device), torch.randn(4, 3, device=device)
    c, empty = torch.empty(6, 3, device=device), torch.empty(0, 3, device=device)
    mm2((a[:0], b, empty, 1.0, False, DROP_NONE), (a, b, c, 2.0, False, DROP_NONE))
    assert len(calls) == 1
    torch.testing.assert_close(c, 2.0 * a @ b, rtol=1e-5, atol=1e-5)
