"""Tiny causal LMs of each decoder family the fused decoder covers, built from configs (nothing downloaded)."""
from __future__ import annotations

import torch
import transformers

_COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=211, max_position_embeddings=64)

# family -> (config class, model class, extra config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "final_logit_softcapping": 3.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 48,
                                                            "shared_expert_intermediate_size": 96}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 48, "head_dim": 16}),
}

# RMSNorm modules per decoder layer (besides the final norm): Qwen3 and Gemma 3 norm q and k, Gemma 2/3 also
# norm each sub-block's output.
NORMS_PER_LAYER = {"llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 4, "gemma": 2, "gemma2": 4, "gemma3": 6,
                   "mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 4}
# gated MLPs per decoder layer: mixtures of experts have none outside their expert stacks, but Qwen2-MoE's shared
# expert is one
GLU_PER_LAYER = {"mixtral": 0, "qwen3_moe": 0}


def tiny_causal_lm(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(dtype)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma): move them so that a dropped weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
