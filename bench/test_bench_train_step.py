"""A LoRA training step (forward, backward, AdamW) of a small Llama built from LlamaConfig (no downloads).

Baseline: Hugging Face PEFT's get_peft_model on an identical copy, with the same adapters and the same optimizer.
On GPU the decoder layers have Llama-3-8B's shapes (two of them); on CPU everything is tiny.
"""
import copy

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peft_fast
from benchutil import ALPHA, BASE_DTYPE, DEVICE, ON_GPU, RANK, both_sides, measure

if ON_GPU:
    MODEL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=2, vocab_size=32000)
    BATCH, SEQ = 4, 1024
else:
    MODEL = dict(hidden_size=256, intermediate_size=896, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=1024)
    BATCH, SEQ = 2, 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama() -> LlamaForCausalLM:
    config = LlamaConfig(**MODEL, max_position_embeddings=SEQ, attn_implementation="sdpa")
    with torch.device(DEVICE):  # initialise in place: a CPU-side init of the GPU model takes seconds
        return LlamaForCausalLM(config).to(BASE_DTYPE)


def _train_step(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@both_sides
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_train_step(benchmark, impl, dropout):
    torch.manual_seed(0)
    base = _llama()
    ref_base = copy.deepcopy(base)
    # Random B (not PEFT's zeros) so that the loss check below exercises the LoRA path; speed is the same.
    kw = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False)
    fast = peft_fast.patch(base, peft_fast.LoraConfig(**kw))
    ref = peft.get_peft_model(ref_base, peft.LoraConfig(**kw))
    ref.load_state_dict({k: v for k, v in fast.state_dict().items() if "lora_" in k}, strict=False)
    fast.train(), ref.train()
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device=DEVICE)

    err = None
    if dropout == 0:
        with torch.no_grad():
            a, b = fast(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
        err = (abs(a - b) / abs(b)).item()

    label = (f"train step llama h{MODEL['hidden_size']} i{MODEL['intermediate_size']} "
             f"L{MODEL['num_hidden_layers']} {BATCH}x{SEQ} p={dropout}")
    measure(benchmark, impl, label, _train_step(fast, ids), _train_step(ref, ids),
            baseline=f"peft {peft.__version__} get_peft_model", err=err)
