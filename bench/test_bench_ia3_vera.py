"""(IA)³ and VeRA: a training step (forward, backward, AdamW) of a small Llama, and decode through one adapted layer.

Baseline: Hugging Face PEFT's get_peft_model with the same config on an identical copy, with the same adapter weights.
On GPU the Llama has two decoder layers of Llama-3-8B's shapes and the decode layer is 4096x4096; on CPU everything
is tiny (the train step's model as in test_bench_train_step.py).
"""
import copy

import peft
import pytest
import torch
from torch import nn

import peft_fast
from benchutil import BASE_DTYPE, DEVICE, ON_GPU, both_sides, inference, measure, rel_err
from peft_fast.tuners.ia3 import IA3Config
from peft_fast.tuners.vera import VeraConfig
from test_bench_train_step import BATCH, MODEL, SEQ, TARGETS, _llama, _train_step

VERA_RANK = 256 if ON_GPU else 64
DECODE_SHAPE = (4096, 4096) if ON_GPU else (512, 1024)
DECODE_TOKENS = (1, 4, 16)
# (label, peft_fast config class, PEFT config class, keyword arguments); IA3 as its paper places it: keys, values and
# the MLP's down projection (feedforward, input-scaled).
KINDS = {
    "ia3": (IA3Config, peft.IA3Config, dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                            feedforward_modules=["down_proj"], init_ia3_weights=False)),
    "vera": (VeraConfig, peft.VeraConfig, dict(r=VERA_RANK, target_modules=TARGETS, init_weights=False)),
}


def _pair(base: nn.Module, kind: str, **extra):
    """(peft_fast model, PEFT model) over identical copies of `base`, PEFT's adapter tensors copied over."""
    fast_cls, ref_cls, kw = KINDS[kind]
    kw = {**kw, **extra}
    fast = peft_fast.get_peft_model(copy.deepcopy(base), fast_cls(**kw))
    ref = peft.get_peft_model(base, ref_cls(**kw))
    fast.load_state_dict(ref.state_dict())  # same names by design: vectors (and VeRA's projections) match
    fast_params = dict(fast.named_parameters())
    with torch.no_grad():  # VeRA's Λ_b starts at ones, IA3's vectors near them: make them all differ
        g = torch.Generator().manual_seed(1)
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.mul_((0.5 + torch.rand(p.shape, generator=g)).to(p.device, p.dtype))
                fast_params[name].copy_(p)
    return fast, ref


@both_sides
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("kind", ["ia3", "vera"])
def test_train_step(benchmark, impl, kind, dropout):
    if kind == "ia3" and dropout:
        pytest.skip("IA3 has no dropout")
    torch.manual_seed(0)
    fast, ref = _pair(_llama(), kind, **({"vera_dropout": dropout} if kind == "vera" else {}))
    fast.train(), ref.train()
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device=DEVICE)
    err = None
    if dropout == 0:
        with torch.no_grad():
            a, b = fast(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
        err = (abs(a - b) / abs(b)).item()
    label = (f"{kind} train step llama h{MODEL['hidden_size']} i{MODEL['intermediate_size']} "
             f"L{MODEL['num_hidden_layers']} {BATCH}x{SEQ}" + (f" p={dropout}" if kind == "vera" else ""))
    measure(benchmark, impl, label, _train_step(fast, ids), _train_step(ref, ids),
            baseline=f"peft {peft.__version__} get_peft_model", err=err)


class OneLayer(nn.Module):
    def __init__(self, in_f: int, out_f: int):
        super().__init__()
        self.proj = nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=BASE_DTYPE)

    def forward(self, x):
        return self.proj(x)


@both_sides
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
@pytest.mark.parametrize("role", ["ia3-output", "ia3-feedforward", "vera"])
def test_decode(benchmark, impl, role, tokens):
    torch.manual_seed(0)
    in_f, out_f = DECODE_SHAPE
    kind = role.partition("-")[0]
    extra = {"target_modules": ["proj"]}
    if kind == "ia3":
        extra["feedforward_modules"] = ["proj"] if role == "ia3-feedforward" else []
    fast, ref = _pair(OneLayer(in_f, out_f), kind, **extra)
    fast.eval(), ref.eval()
    x = torch.randn(tokens, 1, in_f, device=DEVICE, dtype=BASE_DTYPE)  # `tokens` sequences, one new token each
    err = rel_err(inference(fast, x)(), inference(ref, x)())
    label = f"{role} decode {in_f}x{out_f} M={tokens}"
    measure(benchmark, impl, label, inference(fast, x), inference(ref, x),
            baseline=f"peft {peft.__version__} {kind} layer", err=err)
