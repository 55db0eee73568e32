"""OFT and AdaLoRA: a training step of a small Llama (forward, backward, AdamW; AdaLoRA's update_and_allocate and
orthogonal penalty included) and one layer's decode, peft_fast against Hugging Face PEFT.

Baseline: PEFT's get_peft_model with its OFTConfig / AdaLoraConfig on an identical copy, with the same adapter
weights (copied by name). PEFT's OFT forms every block rotation and rotates the input on each call; peft_fast does
the same in training and, outside training, folds the rotation into the base weight once and caches it. PEFT's
AdaLoRA scales its [tokens, out] delta twice before adding it; peft_fast scales the [tokens, r] product and adds
with one addmm, and at inference uses only the kept ranks, cached. The train step's model and sizes are
test_bench_train_step.py's (Llama-3-8B shapes on a GPU, tiny on a CPU); the decode layer is
test_bench_lora_linear.py's.
"""
import copy

import peft
import pytest
import torch
from torch import nn

import peft_fast  # noqa: F401  (the package; the tuners register below)
from benchutil import ALPHA, BASE_DTYPE, DEVICE, RANK, both_sides, inference, measure, rel_err
from peft_fast.tuners.adalora import AdaLoraConfig
from peft_fast.tuners.oft import OFTConfig
from test_bench_lora_linear import DECODE_TOKENS, SHAPES, OneLayer
from test_bench_train_step import BATCH, MODEL, SEQ, TARGETS, _llama

ADALORA = {"init_r": RANK, "target_r": RANK // 2, "lora_alpha": ALPHA, "init_lora_weights": False,
           "total_step": 10**6, "tinit": 10, "tfinal": 10, "deltaT": 5}
# name -> (peft_fast config class, PEFT config class, config keywords)
TYPES = {
    "oft": (OFTConfig, peft.OFTConfig, {"oft_block_size": 32, "init_weights": False}),
    "oft-cayley": (OFTConfig, peft.OFTConfig, {"oft_block_size": 32, "init_weights": False,
                                               "use_cayley_neumann": False}),
    "adalora": (AdaLoraConfig, peft.AdaLoraConfig, ADALORA),
}
PREFIXES = ("oft_R", "lora_")


def _pair(kind: str, base: nn.Module, targets, **extra):
    """(peft_fast model, PEFT model) over identical copies of `base`, with identical random adapters."""
    fast_cls, ref_cls, own = TYPES[kind]
    kw = {"target_modules": targets, **own, **extra}
    ref_base = copy.deepcopy(base)
    fast = peft_fast.get_peft_model(base, fast_cls(**kw))
    ref = peft.get_peft_model(ref_base, ref_cls(**kw))
    adapters = {k: v for k, v in fast.state_dict().items() if any(p in k for p in PREFIXES)}
    if kind.startswith("oft"):  # near the identity, as trained blocks are (the Neumann series is then accurate)
        adapters = {k: 0.1 * v for k, v in adapters.items()}
        fast.load_state_dict(adapters, strict=False)
    missing = [k for k in ref.load_state_dict(adapters, strict=False).missing_keys if any(p in k for p in PREFIXES)]
    assert adapters and not missing, f"adapter keys PEFT has but peft_fast lacks: {missing}"
    return fast, ref


def _train_step(model, ids, allocate: bool):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    count = [0]

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if allocate:  # AdaLoRA's recipe: after the optimizer step, before zero_grad
            model.update_and_allocate(count[0])
            count[0] += 1
        opt.zero_grad(set_to_none=True)

    return step


@both_sides
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("kind", list(TYPES))
def test_oft_adalora_train_step(benchmark, impl, kind, dropout):
    if kind.startswith("oft") and dropout:
        pytest.skip("OFT's module_dropout has no effect (in PEFT 0.21.2 either)")
    torch.manual_seed(0)
    extra = {"lora_dropout": dropout, "task_type": "CAUSAL_LM"} if kind == "adalora" else {}
    fast, ref = _pair(kind, _llama(), TARGETS, **extra)
    fast.train(), ref.train()
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device=DEVICE)
    err = None
    if dropout == 0:  # with dropout the interleaved rounds draw different masks
        with torch.no_grad():
            a, b = fast(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
        err = (abs(a - b) / abs(b)).item()
    label = (f"{kind} train step llama h{MODEL['hidden_size']} i{MODEL['intermediate_size']} "
             f"L{MODEL['num_hidden_layers']} {BATCH}x{SEQ} p={dropout}")
    allocate = kind == "adalora"
    measure(benchmark, impl, label, _train_step(fast, ids, allocate), _train_step(ref, ids, allocate),
            baseline=f"peft {peft.__version__} get_peft_model", err=err)


@both_sides
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", list(TYPES))
def test_oft_adalora_decode(benchmark, impl, kind, shape, tokens):
    torch.manual_seed(0)
    in_f, out_f = shape
    base = nn.Linear(in_f, out_f, bias=False, device=DEVICE, dtype=BASE_DTYPE)
    fast, ref = _pair(kind, OneLayer(base), ["proj"])
    fast.eval(), ref.eval()
    x = torch.randn(tokens, 1, in_f, device=DEVICE, dtype=BASE_DTYPE)  # `tokens` sequences, one new token each
    err = rel_err(inference(fast, x)(), inference(ref, x)())
    label = f"{kind} decode {in_f}x{out_f} M={tokens}"
    layer = "oft.Linear" if kind.startswith("oft") else "adalora.SVDLinear"
    measure(benchmark, impl, label, inference(fast, x), inference(ref, x),
            baseline=f"peft {peft.__version__} {layer}", err=err)
