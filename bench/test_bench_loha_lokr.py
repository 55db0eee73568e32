"""LoHa and LoKr: a training step of a small Llama (forward, backward, AdamW) and one layer's decode, peft_fast
against Hugging Face PEFT.

Baseline: PEFT's get_peft_model with its LoHaConfig / LoKrConfig on an identical copy, with the same adapter
weights (copied by name). PEFT builds ΔW and runs a second matmul for it on every call; peft_fast folds ΔW into the
base matmul (float32) or applies it in the activations' dtype (16-bit), and outside training caches it. The train
step's model and sizes are test_bench_train_step.py's (Llama-3-8B shapes on a GPU, tiny on a CPU); the decode layer
is test_bench_lora_linear.py's.
"""
import copy

import peft
import pytest
import torch
from torch import nn

import peft_fast  # noqa: F401  (the package; the tuners register below)
from benchutil import ALPHA, BASE_DTYPE, DEVICE, RANK, both_sides, inference, measure, rel_err
from peft_fast.tuners.loha import LoHaConfig
from peft_fast.tuners.lokr import LoKrConfig
from test_bench_lora_linear import DECODE_TOKENS, SHAPES, OneLayer
from test_bench_train_step import BATCH, MODEL, SEQ, TARGETS, _llama, _train_step

# name -> (peft_fast config class, PEFT config class, extra config keywords)
TYPES = {
    "loha": (LoHaConfig, peft.LoHaConfig, {}),
    "lokr": (LoKrConfig, peft.LoKrConfig, {}),
    "lokr-decompose_both": (LoKrConfig, peft.LoKrConfig, {"decompose_both": True, "r": 4}),
}


def _pair(kind: str, base: nn.Module, targets, **extra):
    """(peft_fast model, PEFT model) over identical copies of `base`, with identical random adapters."""
    fast_cls, ref_cls, own = TYPES[kind]
    kw = {"r": RANK, "alpha": ALPHA, "target_modules": targets, "init_weights": False, **own, **extra}
    ref_base = copy.deepcopy(base)
    fast = peft_fast.get_peft_model(base, fast_cls(**kw))
    ref = peft.get_peft_model(ref_base, ref_cls(**kw))
    adapters = {k: v for k, v in fast.state_dict().items() if "hada_" in k or "lokr_" in k}
    missing = [k for k in ref.load_state_dict(adapters, strict=False).missing_keys if "hada_" in k or "lokr_" in k]
    assert adapters and not missing, f"adapter keys PEFT has but peft_fast lacks: {missing}"
    return fast, ref


@both_sides
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("kind", list(TYPES))
def test_lycoris_train_step(benchmark, impl, kind, dropout):
    torch.manual_seed(0)
    fast, ref = _pair(kind, _llama(), TARGETS, rank_dropout=dropout, module_dropout=dropout)
    fast.train(), ref.train()
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device=DEVICE)
    err = None
    if dropout == 0:  # with dropout the interleaved rounds draw different masks
        with torch.no_grad():
            a, b = fast(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
        err = (abs(a - b) / abs(b)).item()
    label = (f"{kind} train step llama h{MODEL['hidden_size']} i{MODEL['intermediate_size']} "
             f"L{MODEL['num_hidden_layers']} {BATCH}x{SEQ} p={dropout}")
    measure(benchmark, impl, label, _train_step(fast, ids), _train_step(ref, ids),
            baseline=f"peft {peft.__version__} get_peft_model", err=err)


@both_sides
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", list(TYPES))
def test_lycoris_decode(benchmark, impl, kind, shape, tokens):
    torch.manual_seed(0)
    in_f, out_f = shape
    base = nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=BASE_DTYPE)
    fast, ref = _pair(kind, OneLayer(base), ["proj"])
    fast.eval(), ref.eval()
    x = torch.randn(tokens, 1, in_f, device=DEVICE, dtype=BASE_DTYPE)  # `tokens` sequences, one new token each
    err = rel_err(inference(fast, x)(), inference(ref, x)())
    label = f"{kind} decode {in_f}x{out_f} M={tokens}"
    measure(benchmark, impl, label, inference(fast, x), inference(ref, x),
            baseline=f"peft {peft.__version__} {kind.split('-')[0]}.Linear", err=err)
