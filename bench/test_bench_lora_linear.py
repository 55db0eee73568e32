"""One LoRA layer: peft_fast's LoraLinear (via get_peft_model) against PEFT's lora.Linear on an identical copy.

Baseline: Hugging Face PEFT `lora.Linear` over the same bf16 base weight and the same fp32 adapter weights.
The 4-bit (QLoRA) layer has its own file: test_bench_qlora_linear.py.
"""
import copy

import peft
import pytest
import torch
from torch import nn

import peft_fast
from benchutil import ALPHA, BASE_DTYPE, DEVICE, ON_GPU, RANK, both_sides, inference, measure, rel_err

# (in_features, out_features): Llama-3-8B's q/o, gate/up and down projections; on CPU one small layer, to keep
# `pytest bench/` short there.
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)] if ON_GPU else [(512, 1024)]
TOKENS = 4096 if ON_GPU else 256
DECODE_TOKENS = (1, 4, 16)
BASELINE = f"peft {peft.__version__} lora.Linear"


class OneLayer(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def _pair(base: nn.Module, dropout: float, base_copy: nn.Module | None = None):
    """(peft_fast model, PEFT model) over identical copies of `base`, with identical random adapters."""
    kw = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False)
    ref_base = base_copy if base_copy is not None else copy.deepcopy(base)
    fast = peft_fast.get_peft_model(OneLayer(base), peft_fast.LoraConfig(**kw))
    ref = peft.get_peft_model(OneLayer(ref_base), peft.LoraConfig(**kw))
    # Same parameter names by design, so the adapters copy over by name (the bases are already identical).
    lora = {k: v for k, v in fast.state_dict().items() if "lora_" in k}
    missing = [k for k in ref.load_state_dict(lora, strict=False).missing_keys if "lora_" in k]
    assert lora and not missing, f"adapter keys PEFT has but peft_fast lacks: {missing}"
    return fast, ref


def _linear(in_f: int, out_f: int) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=BASE_DTYPE)


def _fwd_bwd(model, x, gy):
    params = [x] + [p for p in model.parameters() if p.requires_grad]
    return lambda: torch.autograd.grad(model(x), params, gy)


def _bench_fwd_bwd(benchmark, impl, label, fast, ref, in_f, out_f, dropout, baseline):
    fast.train(), ref.train()
    x = torch.randn(1, TOKENS, in_f, device=DEVICE, dtype=BASE_DTYPE, requires_grad=True)
    gy = torch.randn(1, TOKENS, out_f, device=DEVICE, dtype=BASE_DTYPE)
    err = None
    if dropout == 0:  # with dropout the two draw different masks
        with torch.no_grad():
            err = rel_err(fast(x), ref(x))
    measure(benchmark, impl, label, _fwd_bwd(fast, x, gy), _fwd_bwd(ref, x, gy), baseline=baseline, err=err)


@both_sides
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lora_linear_fwd_bwd(benchmark, impl, shape, dropout):
    torch.manual_seed(0)
    in_f, out_f = shape
    fast, ref = _pair(_linear(in_f, out_f), dropout)
    label = f"lora_linear fwd+bwd {in_f}x{out_f} M={TOKENS} p={dropout}"
    _bench_fwd_bwd(benchmark, impl, label, fast, ref, in_f, out_f, dropout, BASELINE)


@both_sides
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lora_linear_decode(benchmark, impl, shape, tokens):
    torch.manual_seed(0)
    in_f, out_f = shape
    fast, ref = _pair(_linear(in_f, out_f), 0.0)
    fast.eval(), ref.eval()
    x = torch.randn(tokens, 1, in_f, device=DEVICE, dtype=BASE_DTYPE)  # `tokens` sequences, one new token each

    err = rel_err(inference(fast, x)(), inference(ref, x)())
    label = f"lora_linear decode {in_f}x{out_f} M={tokens}"
    measure(benchmark, impl, label, inference(fast, x), inference(ref, x), baseline=BASELINE, err=err)


@pytest.mark.skipif(not ON_GPU, reason="the one-launch decode is a Triton path: on a GPU only (gpu_check stage bench)")
@both_sides
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("tokens", (1, 16))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lora_decode_one_launch_vs_two(benchmark, impl, shape, tokens, rank):
    """The crossover behind lora_decode.DECODE_MAX_A_BYTES: the LoRA delta at decode as one launch (each out tile
    re-reads A) against the shrink and expand launches, whatever the bound would choose, on the same layer."""
    from peft_fast.kernels.common import lora_decode

    torch.manual_seed(0)
    in_f, out_f = shape
    kw = dict(r=rank, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False)
    model = peft_fast.get_peft_model(OneLayer(_linear(in_f, out_f)), peft_fast.LoraConfig(**kw)).eval()
    x = torch.randn(tokens, 1, in_f, device=DEVICE, dtype=BASE_DTYPE)
    run = inference(model, x)

    def with_bound(limit):
        def timed():
            saved, lora_decode.DECODE_MAX_A_BYTES = lora_decode.DECODE_MAX_A_BYTES, limit
            try:
                return run()
            finally:
                lora_decode.DECODE_MAX_A_BYTES = saved
        return timed

    one, two = with_bound(1 << 40), with_bound(0)
    label = f"lora decode one launch vs two {in_f}x{out_f} r={rank} M={tokens} (A {rank * in_f * 4 >> 10} KiB)"
    measure(benchmark, impl, label, one, two, baseline="the same layer's shrink + expand launches",
            err=rel_err(one(), two()))
