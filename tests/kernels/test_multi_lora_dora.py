"""The DoRA epilogue of the batched kernels (kernels/lora_expand.py, kernels/multi_lora.py): per slot s with scale
row c_s, y = y + (c_s - 1)·(y - base_bias) + c_s·delta; Triton against the reference in float64, both against
the formula written out per token, LoRA slots (c = 1) bit-identical to the plain expand, untouched rows exact."""
import functools

import pytest
import torch
from mixed_formula import by_hand

from peft_fast.kernels import (
    lora_expand_reference,
    lora_expand_triton,
    make_lora_batch_meta,
    multi_lora,
    multi_lora_reference,
    multi_lora_triton,
)



def _case(T, in_f, out_f, ranks, device, *, dora_slots, base_bias=True, lora_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    n, r_max = len(ranks), max(ranks)
    a, b = rnd(n, r_max, in_f) / in_f**0.5, rnd(n, out_f, r_max) / 4
    for s, r in enumerate(ranks):
        a[s, r:] = float("nan")  # never read beyond a slot's rank
        b[s, :, r:] = float("nan")
    c = torch.ones(n, out_f, dtype=torch.float64)
    for s in dora_slots:
        c[s] = rnd(out_f).abs() + 0.5
    slots = torch.multinomial(torch.ones(n + 1), T, replacement=True, generator=g) - 1
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(x=dev(rnd(T, in_f)), y=dev(rnd(T, out_f)), a=dev(a), b=dev(b),
                ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
                scal=(torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(device),
                lb=dev(rnd(n, out_f)) if lora_bias else None, c=dev(c),
                bb=dev(rnd(out_f)) if base_bias else None, meta=make_lora_batch_meta(slots.to(device), n))


def _run(fn, k):
    return fn(k["x"], k["y"], k["a"], k["b"], k["ranks"], k["scal"], k["meta"], k["lb"], dora_scale=k["c"],
              base_bias=k["bb"])


@pytest.mark.parametrize("base_bias", [True, False])
def test_reference_is_the_formula(base_bias):
    k = _case(23, 12, 10, [3, 0, 5, 2], "cpu", dora_slots=[0, 2], base_bias=base_bias, lora_bias=True)
    torch.testing.assert_close(_run(multi_lora_reference, k), by_hand(k), rtol=1e-12, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("T,in_f,out_f,ranks,dora_slots", [
    (1, 8, 8, [4], [0]),
    (37, 33, 70, [8, 3, 0, 16], [0, 3]),
    (64, 64, 130, [2, 9], [1]),
    (129, 20, 17, [1, 1, 1], [0, 1, 2]),
])
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("fused", [True, False], ids=["one-launch", "two-launches"])
def test_triton_matches_reference_float64(device, T, in_f, out_f, ranks, dora_slots, lora_bias, fused):
    k = _case(T, in_f, out_f, ranks, device, dora_slots=dora_slots, lora_bias=lora_bias, seed=T)
    got = _run(functools.partial(multi_lora_triton, fused=fused), k)
    want = _run(multi_lora_reference, k)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(want.cpu(), by_hand({kk: (v.cpu() if torch.is_tensor(v) else v)
                                                     for kk, v in k.items()}), rtol=1e-11, atol=1e-11)
    slots = k["meta"].token_slots.long().cpu()
    rank_of = torch.cat([k["ranks"].long().cpu(), torch.zeros(1, dtype=torch.long)])
    untouched = rank_of[slots] == 0
    assert torch.equal(got[untouched.to(got.device)], k["y"][untouched.to(got.device)])


@pytest.mark.triton
def test_lora_slots_are_bit_identical_to_the_plain_expand(device):
    """c = 1 exactly: the DoRA term is an exact zero, so LoRA slots beside DoRA ones equal the plain kernel's: bit
    for bit under the interpreter; on a GPU within an ulp, as the compiler contracts the plain kernel's
    `y + acc·scaling` into one FMA (one rounding) where the DoRA epilogue rounds acc·scaling first (H200 run)."""
    k = _case(40, 16, 24, [4, 6, 2], device, dora_slots=[1])
    with_dora = _run(multi_lora_triton, k)
    plain = multi_lora_triton(k["x"], k["y"], k["a"], k["b"], k["ranks"], k["scal"], k["meta"], k["lb"])
    lora_rows = (k["meta"].token_slots != 1)
    if device == "cpu":
        assert torch.equal(with_dora[lora_rows], plain[lora_rows])
    else:
        torch.testing.assert_close(with_dora[lora_rows], plain[lora_rows], rtol=1e-15, atol=1e-15)
    assert not torch.allclose(with_dora[~lora_rows], plain[~lora_rows])


@pytest.mark.triton
def test_expand_alone_and_16_bit(device):
    k = _case(30, 16, 40, [4, 8], device, dora_slots=[0, 1])
    z = torch.randn(30, 8, dtype=torch.float32, device=device)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        y = k["y"].to(dtype)
        b = k["b"].to(dtype)
        args = (z, b, k["ranks"], k["scal"].float(), k["meta"])
        got = lora_expand_triton(y.clone(), *args, dora_scale=k["c"].float(), base_bias=k["bb"].to(dtype))
        want = lora_expand_reference(y.clone(), *args, dora_scale=k["c"].float(), base_bias=k["bb"].to(dtype))
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_shape_errors():
    k = _case(5, 4, 6, [2], "cpu", dora_slots=[0])
    with pytest.raises(ValueError, match="dora_scale"):
        multi_lora(k["x"], k["y"], k["a"], k["b"], k["ranks"], k["scal"], k["meta"], dora_scale=k["c"][:, :3])
    with pytest.raises(ValueError, match="base_bias"):
        multi_lora(k["x"], k["y"], k["a"], k["b"], k["ranks"], k["scal"], k["meta"], base_bias=k["bb"])
