"""Adapters trained on transformers v4 for a model whose layout v5 changed (Mixtral's experts and router): they
load as PEFT loads them, converted to the v5 layout (target_parameters, w1/w3 fused with doubled rank and alpha)."""
import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

from tiny_models import AGAINST_PEFT, assert_close, impl, ref

H, I, E = 32, 48, 2
IDS = torch.tensor([[3, 17, 5, 60, 2], [8, 1, 33, 4, 61]])


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                            num_local_experts=E, num_experts_per_tok=1, max_position_embeddings=32))


def v4_adapter(path, targets):
    """A v4 Mixtral adapter's files: per-expert w1/w2/w3 linears and the router `gate` under block_sparse_moe."""
    config = ref.LoraConfig(r=2, lora_alpha=4, target_modules=targets).to_dict()
    config.update(peft_type="LORA", target_modules=targets)
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config, default=str))
    shapes = {"w1": (H, I), "w3": (H, I), "w2": (I, H)}
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for t in targets:
        mods = ([(f"block_sparse_moe.experts.{e}.{t}", *shapes[t]) for e in range(E)] if t in shapes else
                [("block_sparse_moe.gate", H, E)] if t == "gate" else [("self_attn.q_proj", H, H)])
        for name, fan_in, fan_out in mods:
            key = f"base_model.model.model.layers.0.{name}"
            tensors[f"{key}.lora_A.weight"] = 0.1 * torch.randn(2, fan_in, generator=g)
            tensors[f"{key}.lora_B.weight"] = 0.1 * torch.randn(fan_out, 2, generator=g)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("targets", [["q_proj", "gate"], ["q_proj", "w1", "w2", "w3"]])
def test_v4_mixtral_adapter_loads_as_in_peft(base, targets, tmp_path):
    folder = v4_adapter(tmp_path / "v4", targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.PeftModel.from_pretrained(copy.deepcopy(base), folder)
        got = impl.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    assert (logits(want) - logits(base)).abs().max() > 1e-3  # the experts' adapters matter
    assert_close(logits(got), logits(want))
    for key in ("target_parameters", "rank_pattern", "alpha_pattern"):
        assert sorted(getattr(got.peft_config["default"], key) or []) == sorted(
            getattr(want.peft_config["default"], key) or []), key
    got.save_pretrained(tmp_path / "v5")  # saved in the v5 layout: PEFT loads it back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = ref.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "v5"))
    assert_close(logits(back), logits(want))


def test_v4_vision_language_adapter_with_renamed_keys_loads_as_in_peft(tmp_path):
    """LLaVA-style models moved the language model in v5 (`language_model.model.layers` became
    `model.language_model.layers`): only the keys change, the config does not."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    base = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=16, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64), image_token_index=63))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        model = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(r=4, target_modules=["q_proj"],
                                                                         init_lora_weights=False))
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    v4 = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
          for k, v in tensors.items()}
    assert v4 != tensors
    save_file(v4, str(tmp_path / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = impl.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ids = torch.tensor([[3, 17, 5, 60, 2]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert_close(loaded(input_ids=ids).logits, want)
        for n, p in loaded.named_parameters():  # then the other two ways in: the existing adapter, a state dict
            if "lora_" in n:
                p.zero_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.load_adapter(str(tmp_path), "default")
        assert_close(loaded(input_ids=ids).logits, want)
        fresh = impl.get_peft_model(copy.deepcopy(base), impl.LoraConfig(r=4, target_modules=["q_proj"]))
        impl.set_peft_model_state_dict(fresh, v4)
        assert_close(fresh(input_ids=ids).logits, want)


@pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast without PEFT installed")
def test_without_peft_a_v4_adapter_is_refused_with_the_cause(base, tmp_path, monkeypatch):
    import sys

    folder = v4_adapter(tmp_path / "v4", ["q_proj", "w1", "w2", "w3"])
    monkeypatch.setitem(sys.modules, "peft.utils.transformers_weight_conversion", None)  # import fails
    monkeypatch.delattr("peft.utils.transformers_weight_conversion", raising=False)
    with pytest.warns(UserWarning, match="trained on transformers 4.*needs Hugging Face PEFT"):
        with pytest.raises(ValueError):
            impl.PeftModel.from_pretrained(copy.deepcopy(base), folder)
