"""A whole-model QLoRA training step on a ~1.1B-parameter Llama built from a config (TinyLlama's shapes; on a CPU,
a tiny one for the harness only): tokens/s and peak memory.

Baseline (`peft` columns): every linear layer but the head in bitsandbytes NF4 (`Linear4bit`, double quant, bf16
compute, as transformers' BitsAndBytesConfig builds it), PEFT's prepare_model_for_kbit_training and get_peft_model.
peft_fast runs the same recipe over identical copies of those bitsandbytes layers; `quantize_ms` is peft_fast
over its own NF4Linear layers (peft_fast.quantize, the same bytes, no bitsandbytes). LoRA r=16 on all seven
projections, gradient checkpointing on, AdamW on the adapters.
"""
import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peft_fast
from benchutil import ALPHA, DEVICE, ON_GPU, RANK, both_sides, measure
from test_bench_train_step import TARGETS, _train_step

if ON_GPU:
    MODEL = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 num_hidden_layers=22, vocab_size=32000)
    BATCH, SEQ = 4, 1024
else:
    MODEL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=512)
    BATCH, SEQ = 2, 64
DTYPE = torch.bfloat16


def _bnb_quantize(model: nn.Module) -> nn.Module:
    """What transformers does for BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute)."""
    import bitsandbytes as bnb

    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=DTYPE,
                                  compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(m.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to(DEVICE))
    model.is_loaded_in_4bit = True  # transformers' marker, which prepare_model_for_kbit_training reads
    return model


def _recipe(lib, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model = lib.get_peft_model(model, lib.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                         lora_dropout=0.05, task_type="CAUSAL_LM"))
    model.train()
    return model


@both_sides
def test_qlora_train_step(benchmark, impl):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: the transformers + bitsandbytes "
                                                     "+ PEFT baseline cannot run, so this benchmark is skipped")
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, max_position_embeddings=SEQ, attn_implementation="sdpa")
    with torch.device(DEVICE):
        dense = LlamaForCausalLM(config).to(DTYPE)
    params = sum(p.numel() for p in dense.parameters())
    ours_q = peft_fast.quantize(copy.deepcopy(dense), quant_type="nf4", double_quant=True, compute_dtype=DTYPE)
    try:
        ref_base = _bnb_quantize(dense)
    except Exception as e:
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantize on {DEVICE}: {type(e).__name__}: {e}")
    fast_base = copy.deepcopy(ref_base)
    ref, fast, ours = _recipe(peft, ref_base), _recipe(peft_fast, fast_base), _recipe(peft_fast, ours_q)
    torch.cuda.empty_cache() if ON_GPU else None
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), device=DEVICE)
    tokens = BATCH * SEQ

    def throughput(row):
        tps = {k: tokens / (row[f"{k}_ms"] * 1e-3) for k in ("peft_fast", "peft", "quantize")}
        return {"tokens_per_s": tps["peft_fast"], "peft_tokens_per_s": tps["peft"],
                "quantize_tokens_per_s": tps["quantize"],
                "note": f"{tps['peft_fast']:.0f} vs {tps['peft']:.0f} tokens/s "
                        f"(peft_fast.quantize: {tps['quantize']:.0f})"}

    label = (f"qlora train step llama {params / 1e9:.2f}B h{MODEL['hidden_size']} L{MODEL['num_hidden_layers']} "
             f"{BATCH}x{SEQ}")
    measure(benchmark, impl, label, _train_step(fast, ids), _train_step(ref, ids), warmup=2,
            baseline=f"transformers + bitsandbytes {bnb.__version__} + peft {peft.__version__}",
            also={"quantize": _train_step(ours, ids)}, extra=throughput)
