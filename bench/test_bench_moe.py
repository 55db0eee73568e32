"""LoRA on mixture-of-experts weights (target_parameters): one experts layer, training (forward + backward) and
decode, peft_fast against Hugging Face PEFT's lora.ParamWrapper, with the same layer without LoRA timed alongside.

PEFT adds every expert's B·A into a weight-sized delta and runs the layer through a parametrization on each call;
peft_fast runs the layer's grouped matmuls and adds each projection's LoRA as one grouped shrink/expand over the
routed rows (Triton on a GPU, torch's grouped matmul on a CPU). Shapes: Mixtral-8x7B's and Qwen3-30B-A3B's experts
on a GPU, small ones on a CPU. The issue's targets: at least 2x PEFT's speed and at most 1.3x the layer without
LoRA (the `base` column); a tiny Mixtral model's training step is the whole-model check. The `nf4` train rows run
peft_fast's 4-bit expert stacks (QLoRA on experts, which PEFT cannot) against PEFT's 16-bit ones: the memory column
is the point there, the time the price of dequantizing twice.
"""
import copy

import peft
import pytest
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import peft_fast
from benchutil import ALPHA, BASE_DTYPE, DEVICE, ON_GPU, RANK, both_sides, measure, rel_err

# name -> (hidden, expert intermediate, experts, experts per token)
LAYERS = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)} if ON_GPU else \
    {"small-8e": (256, 512, 8, 2), "small-64e": (128, 64, 64, 8)}
TRAIN_TOKENS = 4096 if ON_GPU else 256
DECODE_TOKENS = (1, 8)
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


class OneExperts(nn.Module):
    def __init__(self, hidden: int, inter: int, experts: int, top_k: int):
        super().__init__()
        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                            num_experts_per_tok=top_k)
        cfg._experts_implementation = "grouped_mm"  # transformers' fastest generic path, on both sides
        self.experts = MixtralExperts(cfg)
        nn.init.normal_(self.experts.gate_up_proj, std=hidden ** -0.5)
        nn.init.normal_(self.experts.down_proj, std=inter ** -0.5)

    def forward(self, x, index, weights):
        return self.experts(x, index, weights)


def _routing(tokens: int, experts: int, top_k: int, hidden: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, BASE_DTYPE)
    index = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices.to(DEVICE)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1).to(DEVICE, BASE_DTYPE)
    return x, index, weights


def _pair(name: str, four_bit: bool = False):
    """(base layer, peft_fast model, PEFT model) with the same adapters; `four_bit`: peft_fast's experts are stored
    in 4 bits (peft_fast.quantize), PEFT's stay 16-bit (it has no 4-bit stacks)."""
    hidden, inter, experts, top_k = LAYERS[name]
    torch.manual_seed(0)
    with torch.device(DEVICE):  # Mixtral's stacks are 1.4B values: initialised where they run, not on the CPU
        base = OneExperts(hidden, inter, experts, top_k).to(BASE_DTYPE)
    kw = dict(target_modules=[], target_parameters=TARGETS, r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    mine = peft_fast.quantize(copy.deepcopy(base)) if four_bit else copy.deepcopy(base)
    fast = peft_fast.get_peft_model(mine, peft_fast.LoraConfig(**kw))
    fast.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" in k}, strict=False)
    return base, fast, ref


def _train(model, args):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        out = model(*args)
        out.float().pow(2).mean().backward()
        for p in params:
            p.grad = None
    return step


def _decode(model, args):
    model.requires_grad_(False)  # served adapters are frozen (PeftModel.from_pretrained's default)

    def run():
        with torch.no_grad():
            return model(*args)
    return run


@both_sides
@pytest.mark.parametrize("four_bit", [False, True], ids=["bf16", "nf4"] if ON_GPU else ["fp32", "nf4"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_moe_layer_train(benchmark, impl, name, four_bit):
    base, fast, ref = _pair(name, four_bit)
    hidden, inter, experts, top_k = LAYERS[name]
    args = _routing(TRAIN_TOKENS, experts, top_k, hidden)
    with torch.no_grad():
        err = None if four_bit else rel_err(fast(*args).float(), ref(*args).float())
    base.requires_grad_(False)
    x_base = args[0].clone().requires_grad_()  # the base layer's step still has a backward (to its input)
    label = f"moe {name} h{hidden} i{inter} E{experts} top{top_k} train {TRAIN_TOKENS} tokens" + \
        (" (4-bit experts vs PEFT's 16-bit)" if four_bit else "")
    measure(benchmark, impl, label, _train(fast, args), _train(ref, args), err=err,
            baseline=f"peft {peft.__version__} target_parameters",
            also={"base": lambda: base(x_base, *args[1:]).float().pow(2).mean().backward()},
            extra=lambda row: {"vs_base": row["peft_fast_ms"] / row["base_ms"]})


@both_sides
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_moe_layer_decode(benchmark, impl, name, tokens):
    base, fast, ref = _pair(name)
    fast.eval(), ref.eval()
    hidden, inter, experts, top_k = LAYERS[name]
    args = _routing(tokens, experts, top_k, hidden)
    with torch.no_grad():
        err = rel_err(fast(*args).float(), ref(*args).float())
    label = f"moe {name} h{hidden} i{inter} E{experts} top{top_k} decode {tokens} tokens"
    measure(benchmark, impl, label, _decode(fast, args), _decode(ref, args), err=err,
            baseline=f"peft {peft.__version__} target_parameters", also={"base": _decode(base, args)},
            extra=lambda row: {"vs_base": row["peft_fast_ms"] / row["base_ms"]})


@both_sides
def test_tiny_mixtral_train_step(benchmark, impl):
    cfg = MixtralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).to(DEVICE, BASE_DTYPE)
    kw = dict(target_modules=["q_proj", "v_proj"], target_parameters=TARGETS, r=RANK, lora_alpha=ALPHA,
              init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    fast = peft_fast.get_peft_model(model, peft_fast.LoraConfig(**kw))
    fast.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(0, 512, (4, 64), device=DEVICE)

    def step(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)

        def run():
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    with torch.no_grad():
        err = rel_err(fast(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float())
    measure(benchmark, impl, "moe tiny mixtral train step 4x64 (experts + q,v)", step(fast), step(ref), err=err,
            baseline=f"peft {peft.__version__} target_parameters")
