"""A tiny Llama saved once and loaded in 4-bit by transformers + bitsandbytes on CPU, for the QLoRA tests."""
import warnings

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
# (model dtype, bnb compute dtype, double quant, quant type). The last case computes the base in bf16 under a
# float32 model: the base layer then runs on its own and the deltas are added in PEFT's 4-bit order.
CASES = [
    (torch.float32, torch.float32, True, "nf4"),
    (torch.float32, torch.float32, False, "fp4"),
    (torch.bfloat16, torch.bfloat16, True, "nf4"),
    (torch.float32, torch.bfloat16, False, "nf4"),
]
IDS = ["fp32-dq-nf4", "fp32-fp4", "bf16-dq-nf4", "fp32-bf16compute"]


def save_tiny_llama(path):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load4(path, case):
    dtype, compute, double, qt = case
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_compute_dtype=compute,
                           bnb_4bit_use_double_quant=double)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=dtype)
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    return model
