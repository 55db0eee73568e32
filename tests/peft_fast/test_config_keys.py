"""adapter_config.json keys peft_fast does not model: unknown ones warn, PEFT features that would change outputs
are refused (ignoring them would silently diverge from PEFT), init-only recipes warn, neutral values are silent."""
import json
import warnings

import pytest
import torch
from tiny_models import AGAINST_PEFT

import peft_fast

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast-only behaviour")


def _load(extra):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = peft_fast.LoraConfig.from_dict({"r": 4, "target_modules": ["0"], **extra}, source="cfg.json")
    return cfg, [str(w.message) for w in caught]


def test_unknown_key_warns_and_is_ignored():
    cfg, messages = _load({"brand_new_option": 3})
    assert cfg.r == 4 and any("brand_new_option" in m and "ignored" in m for m in messages)


@pytest.mark.parametrize("extra", [{"arrow_config": {"top_k": 2}}, {"alora_invocation_tokens": [1, 2]}])
def test_output_changing_peft_features_are_refused(extra):
    with pytest.raises(NotImplementedError, match=next(iter(extra))):
        _load(extra)


def test_init_only_recipe_warns():
    _, messages = _load({"loftq_config": {"loftq_bits": 4}})
    assert any("loftq_config" in m for m in messages)


def test_neutral_peft_values_are_silent():
    _, messages = _load({"megatron_config": None, "loftq_config": {}, "use_qalora": False,
                         "runtime_config": {"ephemeral_gpu_offload": False}, "layer_replication": None,
                         "ensure_weight_tying": False})
    assert messages == []


def test_refused_file_leaves_the_model_unchanged(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 6))
    model = peft_fast.get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 6)),
                                     peft_fast.LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["alora_invocation_tokens"] = [1, 2]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(NotImplementedError, match="alora_invocation_tokens"):
        peft_fast.PeftModel.from_pretrained(base, str(tmp_path))
    assert type(base[0]) is torch.nn.Linear and all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("name", ["LoraConfig", "LoHaConfig", "LoKrConfig", "IA3Config", "VeraConfig", "OFTConfig",
                                  "AdaLoraConfig"])
def test_constructors_take_pefts_keyword_arguments(name):
    """`Config(**peft_config.to_dict())` and PEFT's extra arguments at their neutral values, as with PEFT."""
    import peft

    extra = {"total_step": 10} if name == "AdaLoraConfig" else {}
    data = getattr(peft, name)(target_modules=["q_proj"], **extra).to_dict()
    data = {k: getattr(v, "value", v) for k, v in data.items()}
    cfg = getattr(peft_fast, name)(**data)
    assert cfg.target_modules == {"q_proj"} and cfg.peft_type == data["peft_type"]


def test_constructor_refuses_as_files_do():
    with pytest.raises(NotImplementedError, match="alora_invocation_tokens"):
        peft_fast.LoraConfig(r=4, alora_invocation_tokens=[1, 2])
    with pytest.raises(TypeError, match="bogus"):
        peft_fast.LoraConfig(r=4, bogus=1)
    with pytest.warns(UserWarning, match="loftq_config"):
        cfg = peft_fast.LoraConfig(r=4, loftq_config={"loftq_bits": 4}, use_qalora=False, peft_version="0.21.2")
    assert cfg.r == 4


def test_inert_peft_values_are_written_back_as_given(tmp_path):
    """PEFT writes its options back as given, even those that change nothing here (QA-LoRA applies only to GPTQ
    layers, which peft_fast does not adapt; a recipe for another initialisation): files and to_peft() keep them,
    and with use_qalora the outputs are plain LoRA's in both libraries."""
    import peft

    extra = {"use_qalora": True, "qalora_group_size": 8, "megatron_core": "my.core", "eva_config": {"rho": 2.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft_fast.LoraConfig(r=2, target_modules=["0"], **extra)
        theirs = peft.LoraConfig(r=2, target_modules=["0"], **extra).to_dict()
    saved = json.loads(cfg.to_json_string())
    for key in extra:
        if key == "eva_config":  # PEFT fills in EvaConfig's defaults
            assert saved[key]["rho"] == theirs[key]["rho"] == 2.0
        else:
            assert saved[key] == theirs[key] == extra[key], key
    round_trip = peft_fast.LoraConfig.from_dict(saved)
    assert json.loads(round_trip.to_json_string())["qalora_group_size"] == 8
    assert cfg.to_peft().use_qalora and cfg.to_peft().qalora_group_size == 8

    outputs = []
    for lib, kw in ((peft, extra), (peft, {}), (peft_fast, extra)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(model, lib.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False,
                                                             **kw))
        with torch.no_grad():
            outputs.append(model(torch.ones(3, 8)))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[2], outputs[1])


def test_weighted_adapters_keep_the_inert_peft_values():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_fast.get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 6)),
                                         peft_fast.LoraConfig(r=2, target_modules=["0"], qalora_group_size=32))
    model.add_weighted_adapter(["default"], [1.0], "w", combination_type="linear")
    assert json.loads(model.peft_config["w"].to_json_string())["qalora_group_size"] == 32
