"""peft_fast.state_dict: PEFT's public state-dict helpers, with PEFT's file keys."""
import torch

import peft_fast


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def test_state_dict_functions_take_the_peft_model():
    """PEFT's get/set_peft_model_state_dict take the PeftModel; so do ours, with file-format keys."""
    src = peft_fast.get_peft_model(_mlp(), peft_fast.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    dst = peft_fast.get_peft_model(_mlp(), peft_fast.LoraConfig(r=2, target_modules=["0"]))
    tensors = peft_fast.get_peft_model_state_dict(src)
    assert set(tensors) == {"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"}
    peft_fast.set_peft_model_state_dict(dst, tensors)
    x = torch.randn(2, 6)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
