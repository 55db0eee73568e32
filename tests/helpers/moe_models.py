"""Tiny mixture-of-experts models for the target_parameters tests: Mixtral and Qwen3-MoE as transformers 5 builds
them (experts as 3-D `gate_up_proj` [E, 2·I, H] and `down_proj` [E, H, I] parameters), built once from seed 0 and
deep-copied per library; gpt-oss's are transposed, with biases. Qwen3-MoE's layer 1 is dense (`mlp_only_layers`): its `mlp.down_proj.weight` is a 2-D
parameter target. In float64 the experts run transformers' eager loop (torch's grouped matmul has no float64)."""
from __future__ import annotations

import copy
import warnings

import torch
from tiny_models import impl, ref
from transformers import GptOssConfig, GptOssForCausalLM, Llama4ForCausalLM, Llama4TextConfig, MixtralConfig, \
    MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
ATTENTION = ["q_proj", "v_proj"]
VOCAB = 64
_CACHE: dict = {}


def _mixtral():
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


def _qwen3_moe():
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=5, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[1], max_position_embeddings=64))


def _gpt_oss():
    """Transposed experts ([E, in, out]) with biases and an interleaved, clamped gate."""
    return GptOssForCausalLM(GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


def _llama4():
    """Llama 4's experts hold 3-D stacks but take no routing (the block scales the tokens before): not transformers'
    shared experts contract, so their parameters run the module with W + ΔW, as PEFT does."""
    return Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
        max_position_embeddings=64, interleave_moe_layer_step=1, attention_chunk_size=16))


BUILDERS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "gpt_oss": _gpt_oss, "llama4": _llama4}


def moe_base(kind: str, dtype=torch.float64):
    if kind not in _CACHE:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CACHE[kind] = BUILDERS[kind]()
    model = copy.deepcopy(_CACHE[kind]).to(dtype)
    if dtype == torch.float64 and kind != "llama4":
        model.set_experts_implementation("eager")
    return model


def moe_cfg(targets: str = "experts", **overrides) -> dict:
    kw = {"r": 3, "lora_alpha": 6, "init_lora_weights": False, "target_parameters": list(EXPERTS),
          "target_modules": list(ATTENTION) if targets == "experts+attention" else []}
    kw.update(overrides)
    return kw


def moe_pair(kind: str, targets: str = "experts", *, seed: int = 0, dtype=torch.float64, base=None, **overrides):
    """(base, PEFT model, implementation model) over copies of one base, adapters drawn under one seed."""
    base = moe_base(kind, dtype) if base is None else base
    kw = moe_cfg(targets, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref_model = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**kw))
        torch.manual_seed(seed)
        impl_model = impl.get_peft_model(copy.deepcopy(base), impl.LoraConfig(**kw))
    return base, ref_model, impl_model


def moe_inputs(batch: int = 3, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g)}


def dense_twin(base, quantized):
    """`base` with every 4-bit weight of `quantized` (peft_fast.quantize of a copy of it) replaced by its dequantized
    values: the dense model the 4-bit one must compute exactly."""
    dense = copy.deepcopy(base)
    for name, m in quantized.named_modules():
        if hasattr(m, "_nf4_names"):
            for n in m._nf4_names:
                getattr(dense.get_submodule(name), n).data = m.dequantize(n).float()
        elif type(m).__name__ == "NF4Linear":
            dense.get_submodule(name).weight.data = m.dequantize().float()
    return dense
