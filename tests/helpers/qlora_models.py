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


def load4(path, case, quant_storage=torch.uint8):
    dtype, compute, double, qt = case
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_compute_dtype=compute,
                           bnb_4bit_use_double_quant=double, bnb_4bit_quant_storage=quant_storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=dtype)
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    return model


def lora_kw(**over):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": list(TARGETS), "init_lora_weights": False, "lora_dropout": 0.0}
    kw.update(over)
    return kw


def make_qlora_pair(path, case, quant_storage=torch.uint8, **over):
    """PEFT and the implementation over two fresh 4-bit loads (codes stored as `quant_storage`), the implementation's
    adapter weights copied from PEFT's; PEFT's 4-bit layer is checked to be the reference."""
    from tiny_models import impl, name_diff, ref

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref_model = ref.get_peft_model(load4(path, case, quant_storage), ref.LoraConfig(**lora_kw(**over)))
        torch.manual_seed(0)
        impl_model = impl.get_peft_model(load4(path, case, quant_storage), impl.LoraConfig(**lora_kw(**over)))
    layer = ref_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb", type(layer)
    r_p, i_p = dict(ref_model.named_parameters()), dict(impl_model.named_parameters())
    assert set(r_p) == set(i_p), name_diff(r_p, i_p)
    with torch.no_grad():
        for n, p in i_p.items():
            if "lora_" in n:
                assert p.dtype == r_p[n].dtype and p.shape == r_p[n].shape, n
                p.copy_(r_p[n])
    return ref_model, impl_model


def ids(seed=1, batch=3, seq=6):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))
