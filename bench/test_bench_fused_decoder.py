"""Whole-model training with the fused decoder (fused= of get_peft_model): tokens/s and peak memory.

On a GPU: a QLoRA step (bitsandbytes NF4 bases, double quant, bf16 compute; LoRA r=16 on all seven projections,
dropout 0.05, gradient checkpointing, AdamW) on a ~1.1B Llama (TinyLlama's shapes, 4x1024 tokens) and on 4 decoder
layers at Llama-3-8B's shapes (vocabulary 128256, 2x1024 tokens). The pair is peft_fast with fused="auto" (Liger on
CUDA when installed) against transformers + bitsandbytes + PEFT; the row also times peft_fast unfused and, with
Liger installed, the compile backend and the PEFT baseline with Liger-Kernel's kernels (applied by
peft_fast.fuse(peft_model, "liger"), to that model only): what the adapter engine adds by itself; and the fast side
with peft_fast.offload_checkpoints (checkpointed layers' inputs in pinned host memory): what the offload costs in
tokens/s and saves in memory, beside transformers' own offload (copies on the compute stream) where it has one.
Memory columns: the peak over the weights, per variant (`*_peak_mib`), and its ratio to PEFT's.

On a CPU (no bitsandbytes kernels worth timing): dense fp32 LoRA on a tiny Llama, fused="compile" against PEFT,
for the harness; CPU times say nothing about GPU speed.
"""
import copy
import inspect
import warnings

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peft_fast
from benchutil import ALPHA, DEVICE, ON_GPU, RANK, both_sides, measure, peak_mib
from peft_fast.fused import liger_available
from test_bench_train_step import TARGETS, _train_step

if ON_GPU:
    SHAPES = {
        "1.1B": (dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                      num_hidden_layers=22, vocab_size=32000), 4, 1024),
        "8B-shape 4 layers": (dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, num_hidden_layers=4, vocab_size=128256), 2, 1024),
    }
    DTYPE = torch.bfloat16
else:
    SHAPES = {"tiny": (dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=2, vocab_size=2048), 2, 128)}
    DTYPE = torch.float32


def _base(model_kw, seq):
    config = LlamaConfig(**model_kw, max_position_embeddings=seq, attn_implementation="sdpa")
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(DTYPE)
    if ON_GPU:
        from test_bench_qlora_model import _bnb_quantize

        model = _bnb_quantize(model)
    return model


def _recipe(lib, model, fused=None):
    kw = {} if fused is None else {"fused": fused}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ON_GPU:
            model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                        gradient_checkpointing_kwargs={"use_reentrant": False})
        model = lib.get_peft_model(model, lib.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                         lora_dropout=0.05, task_type="CAUSAL_LM"), **kw)
    model.train()
    return model


@both_sides
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_decoder_train_step(benchmark, impl, shape):
    if ON_GPU:
        pytest.importorskip("bitsandbytes", reason="the transformers + bitsandbytes + PEFT baseline needs it")
    model_kw, batch, seq = SHAPES[shape]
    torch.manual_seed(0)
    base = _base(model_kw, seq)
    fused = "auto" if ON_GPU else "compile"
    variants = {"peft_fast_unfused": (peft_fast, None)}
    if ON_GPU and liger_available():  # the pair's fast side runs Liger: time the compile backend and PEFT + Liger too
        variants["peft_fast_compile"] = (peft_fast, "compile")
        variants["peft_liger"] = (peft, "liger")
    if ON_GPU:  # the fast side with its checkpoint inputs in host memory (offload_checkpoints moves CUDA tensors)
        variants["peft_fast_offload"] = (peft_fast, fused)
        if "offload" in inspect.signature(getattr(type(base), "activation_checkpointing_enable", len)).parameters:
            variants["peft_fast_hf_offload"] = (peft_fast, fused)  # transformers' own: copies on the compute stream
    models = {name: _recipe(lib, copy.deepcopy(base), f) for name, (lib, f) in variants.items()}
    if "peft_liger" in models:
        peft_fast.fuse(models["peft_liger"], "liger")
    if "peft_fast_offload" in models:
        peft_fast.offload_checkpoints(models["peft_fast_offload"])
    if "peft_fast_hf_offload" in models:
        models["peft_fast_hf_offload"].get_base_model().activation_checkpointing_enable({"use_reentrant": False},
                                                                                        offload=True)
    fast, ref = _recipe(peft_fast, copy.deepcopy(base), fused), _recipe(peft, base)
    ids = torch.randint(0, model_kw["vocab_size"], (batch, seq), device=DEVICE)
    tokens = batch * seq
    steps = {name: _train_step(m, ids) for name, m in models.items()}

    def report(row):
        out = {"tokens_per_s": tokens / (row["peft_fast_ms"] * 1e-3),
               "peft_tokens_per_s": tokens / (row["peft_ms"] * 1e-3)}
        for name in steps:
            out[f"{name}_tokens_per_s"] = tokens / (row[f"{name}_ms"] * 1e-3)
            mem = peak_mib(steps[name])
            out[f"{name}_peak_mib"] = mem
            if mem is not None and row["peft_peak_mib"]:
                out[f"{name}_mem_ratio"] = mem / row["peft_peak_mib"]
        shown = ", ".join(f"{n.removeprefix('peft_fast_')} {out[f'{n}_tokens_per_s']:.0f}" for n in steps)
        out["note"] = (f"fused={fused}: {out['tokens_per_s']:.0f} tokens/s vs PEFT {out['peft_tokens_per_s']:.0f} "
                       f"({shown})")
        return out

    label = f"fused decoder train step llama {shape} {batch}x{seq}" + (" qlora" if ON_GPU else " lora fp32")
    baseline = "transformers + bitsandbytes + peft" if ON_GPU else f"peft {peft.__version__}"
    measure(benchmark, impl, label, _train_step(fast, ids), _train_step(ref, ids), warmup=2, baseline=baseline,
            also=steps, extra=report)
