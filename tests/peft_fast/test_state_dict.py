"""peft_fast.state_dict: PEFT's public state-dict helpers, with PEFT's file keys."""
import pytest
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


def test_save_pretrained_takes_the_values_from_a_given_state_dict(tmp_path):
    """Accelerate and TRL save a sharded model as save_pretrained(dir, state_dict=<gathered full state dict>): the
    adapter's values come from that dict (keys as model.state_dict()'s), not from the parameters, as in PEFT."""
    import peft
    from safetensors.torch import load_file

    params = {}
    for lib in (peft_fast, peft):
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
        full = {k: v + 1 for k, v in model.state_dict().items()}
        params[lib.__name__] = model.state_dict()["base_model.model.0.lora_A.default.weight"]
        model.save_pretrained(tmp_path / lib.__name__, state_dict=full)
        model.save_pretrained(tmp_path / f"{lib.__name__}-main", state_dict=full, is_main_process=False)
        assert not (tmp_path / f"{lib.__name__}-main" / "adapter_model.safetensors").exists()
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft_fast", "peft"))
    assert ours.keys() == theirs.keys()
    assert torch.equal(ours["base_model.model.0.lora_A.weight"], params["peft_fast"] + 1)
    assert torch.equal(theirs["base_model.model.0.lora_A.weight"], params["peft"] + 1)


def test_save_pretrained_refuses_a_state_dict_without_the_adapter(tmp_path):
    import pytest

    model = peft_fast.get_peft_model(_mlp(), peft_fast.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="lacks 2 tensor"):
        model.save_pretrained(tmp_path, state_dict={"base_model.model.0.base_layer.weight": torch.zeros(8, 6)})
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_set_peft_model_state_dict_refuses_a_wrong_shape_that_would_broadcast():
    """A [1, in] tensor where the model has [r, in] would broadcast in a copy: refused, naming it, nothing changed
    (PEFT's load_state_dict refuses it too, with a size-mismatch RuntimeError)."""
    import pytest

    model = peft_fast.get_peft_model(_mlp(), peft_fast.LoraConfig(r=2, target_modules=["0", "2"],
                                                                 init_lora_weights=False))
    tensors = peft_fast.get_peft_model_state_dict(model)
    key = "base_model.model.0.lora_A.weight"
    tensors[key] = tensors[key][:1] + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"0\.lora_A"):
        peft_fast.set_peft_model_state_dict(model, tensors)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_state_dict_functions_match_peft_on_names_partial_dicts_and_state_dict_keys():
    """Against PEFT: an unknown adapter name raises KeyError; a partial dict reports the adapter entries it lacks
    (and the base's) in missing_keys; keys as model.state_dict() names them load."""
    import peft

    for lib in (peft, peft_fast):
        model = lib.get_peft_model(_mlp(), lib.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
        with pytest.raises(KeyError, match="nope"):
            lib.get_peft_model_state_dict(model, adapter_name="nope")
        tensors = lib.get_peft_model_state_dict(model)
        first = sorted(tensors)[0]
        result = lib.set_peft_model_state_dict(model, {first: tensors[first]})
        assert sorted(k for k in result.missing_keys if "lora_" in k) == [
            "base_model.model.0.lora_B.default.weight", "base_model.model.2.lora_A.default.weight",
            "base_model.model.2.lora_B.default.weight"], lib.__name__
        assert "base_model.model.0.base_layer.weight" in result.missing_keys
        doubled = {k: 2 * v for k, v in model.state_dict().items() if "lora_" in k}
        result = lib.set_peft_model_state_dict(model, doubled)
        assert not [k for k in result.missing_keys if "lora_" in k]
        torch.testing.assert_close(model.base_model.model[2].lora_B["default"].weight,
                                   doubled["base_model.model.2.lora_B.default.weight"])


def test_state_dict_functions_refuse_a_model_without_peft_fast_adapters():
    with pytest.raises(ValueError, match="no peft_fast adapter"):
        peft_fast.get_peft_model_state_dict(_mlp())


def test_saving_in_the_other_format_replaces_the_earlier_file(tmp_path):
    """Deliberate difference: PEFT leaves adapter_model.safetensors beside a later .bin save, and its loads then
    read the old weights; here the later save is the one that loads."""
    model = peft_fast.get_peft_model(_mlp(), peft_fast.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("adapter_model")) == ["adapter_model.bin"]
    loaded = peft_fast.PeftModel.from_pretrained(_mlp(), str(tmp_path))
    x = torch.randn(2, 6)
    torch.testing.assert_close(loaded(x), model(x))
