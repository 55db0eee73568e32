"""PEFT's module-level API beside PeftModel: PeftType / TaskType, AutoPeftModel*, inject_adapter_in_model,
load_peft_weights, get_peft_config. Each is compared with PEFT's on the same files and tiny models."""
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tiny_models import AGAINST_PEFT, TinyMLP, assert_close, base_model, default_cfg, impl, inputs, out, peft_fast_only, ref

AUTO = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
        "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
        "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction"]


def test_peft_type_and_task_type_are_peft_s():
    assert [m.value for m in impl.PeftType] == [m.value for m in ref.PeftType]
    assert [m.value for m in impl.TaskType] == [m.value for m in ref.TaskType]
    assert impl.PeftType.LORA == "LORA" and impl.TaskType.CAUSAL_LM == "CAUSAL_LM"
    assert str(impl.TaskType.CAUSAL_LM) == str(ref.TaskType.CAUSAL_LM)
    cfg = impl.LoraConfig(r=2, target_modules=["lin0"], task_type=impl.TaskType.CAUSAL_LM)
    assert cfg.peft_type == impl.PeftType.LORA == ref.PeftType.LORA and cfg.task_type == "CAUSAL_LM"


@pytest.mark.parametrize("name", AUTO)
def test_auto_classes_map_tasks_as_peft_s(name):
    mine, peft_s = getattr(impl, name), getattr(ref, name)
    assert getattr(mine._target_class, "__name__", mine._target_class) == \
        getattr(peft_s._target_class, "__name__", peft_s._target_class)
    assert mine._target_peft_class.__name__ == peft_s._target_peft_class.__name__


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved to disk and two adapters over it (one CAUSAL_LM, one without a task type), saved by PEFT
    from a base loaded from that folder, so their configs name it."""
    root = tmp_path_factory.mktemp("auto")
    base_model("llama").save_pretrained(root / "base")
    for name, task in (("causal", "CAUSAL_LM"), ("plain", None)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = ref.get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"),
                                       ref.LoraConfig(**default_cfg("llama", task_type=task)))
        model.save_pretrained(root / name)
    return root


def _load(cls_name, lib, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(lib, cls_name).from_pretrained(str(path), **kw)


@pytest.mark.parametrize("cls_name,folder", [("AutoPeftModelForCausalLM", "causal"), ("AutoPeftModel", "plain")])
def test_auto_peft_model_loads_base_and_adapter_as_peft(saved, cls_name, folder):
    mine, peft_s = _load(cls_name, impl, saved / folder), _load(cls_name, ref, saved / folder)
    assert type(mine).__name__ == type(peft_s).__name__
    assert isinstance(mine.get_base_model(), LlamaForCausalLM) and not mine.training
    x = inputs("llama")
    with torch.no_grad():
        assert_close(out(mine, x), out(peft_s, x))
    trainable = _load(cls_name, impl, saved / folder, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("cls_name,folder,words", [
    ("AutoPeftModel", "causal", ["task type", "AutoPeftModelForCausalLM"]),
    ("AutoPeftModelForSequenceClassification", "causal", ["AutoPeftModelForCausalLM"]),
])
def test_auto_peft_model_refuses_the_wrong_class_naming_the_right_one(saved, cls_name, folder, words):
    for lib in (impl, ref):
        with pytest.raises(ValueError) as info:
            _load(cls_name, lib, saved / folder)
        if lib is impl and not AGAINST_PEFT:  # peft_fast's message names the class to use
            for w in words:
                assert w.lower() in str(info.value).lower(), info.value


@pytest.mark.parametrize("folder,want", [("causal", "PeftModelForCausalLM"), ("plain", "PeftModelForSeq2SeqLM")])
def test_a_task_class_s_from_pretrained_returns_the_file_s_task_class(saved, folder, want):
    """As PEFT: the adapter's task type picks the class whatever class from_pretrained is called on; an adapter
    without one keeps the class called."""
    base = AutoModelForCausalLM.from_pretrained(saved / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = impl.PeftModelForSeq2SeqLM.from_pretrained(base, str(saved / folder))
    assert type(model).__name__ == want


def test_a_generation_config_assigned_to_a_causal_lm_model_is_the_one_generate_uses():
    """As PEFT: Seq2SeqTrainer assigns args.generation_config to the model it trains, which may be a causal LM."""
    from transformers import GenerationConfig

    model = impl.get_peft_model(base_model("llama"), impl.LoraConfig(**default_cfg("llama", task_type="CAUSAL_LM")))
    ids = inputs("llama", batch=1)["input_ids"]
    model.generation_config = GenerationConfig(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert model.generate(input_ids=ids).shape[1] == ids.shape[1] + 3
    assert model.get_base_model().generation_config.max_new_tokens == 3


def test_auto_peft_model_imports_only_allowed_libraries(saved, tmp_path):
    cfg = json.loads((saved / "plain" / "adapter_config.json").read_text())
    cfg["auto_mapping"]["parent_library"] = "os"
    cfg["auto_mapping"]["base_model_class"] = "system"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "adapter_model.safetensors").write_bytes((saved / "plain" / "adapter_model.safetensors").read_bytes())
    for lib in (impl, ref):
        with pytest.raises(ValueError, match="allowlist"):
            _load("AutoPeftModel", lib, tmp_path)


# ----------------------------------------------------------------------------------------- functional API
def _mlp():
    torch.manual_seed(0)
    return TinyMLP()


def test_inject_adapter_in_model_as_peft():
    mine, peft_s = _mlp(), _mlp()
    kw = default_cfg("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        assert impl.inject_adapter_in_model(impl.LoraConfig(**kw), mine) is mine
        torch.manual_seed(1)
        ref.inject_adapter_in_model(ref.LoraConfig(**kw), peft_s)
    assert [(n, p.requires_grad) for n, p in mine.named_parameters()] == \
        [(n, p.requires_grad) for n, p in peft_s.named_parameters()]
    assert set(mine.peft_config) == {"default"}
    sd_ref = ref.get_peft_model_state_dict(peft_s)
    assert set(impl.get_peft_model_state_dict(mine)) == set(sd_ref)
    impl.set_peft_model_state_dict(mine, sd_ref)
    x = inputs("mlp")
    with torch.no_grad():
        assert_close(out(mine, x), out(peft_s, x))


def test_inject_adapter_in_model_from_a_state_dict_adapts_the_modules_it_names():
    sd = {"lin1.lora_A.weight": torch.randn(2, 32), "lin1.lora_B.weight": torch.randn(32, 2)}
    for lib in (impl, ref):
        model = _mlp()
        with pytest.warns(RuntimeWarning, match="lin0"):
            lib.inject_adapter_in_model(lib.LoraConfig(r=2, target_modules=["lin0"]), model, state_dict=sd)
        assert hasattr(model.lin1, "lora_A") and not hasattr(model.lin0, "lora_A"), lib.__name__


def test_load_peft_weights_and_get_peft_config_as_peft(saved):
    mine, peft_s = impl.load_peft_weights(str(saved / "causal")), ref.load_peft_weights(str(saved / "causal"),
                                                                                        device="cpu")
    assert mine.keys() == peft_s.keys() and all(torch.equal(mine[k], peft_s[k]) for k in mine)
    mapping = {r"self_attn\.q_proj": "self_attn.query"}
    a = impl.load_peft_weights(str(saved / "causal"), key_mapping=mapping)
    b = ref.load_peft_weights(str(saved / "causal"), device="cpu", key_mapping=mapping)
    assert a.keys() == b.keys() and any(".query." in k for k in a)
    data = json.loads((saved / "causal" / "adapter_config.json").read_text())
    config = impl.get_peft_config(data)
    assert type(config).__name__ == "LoraConfig" and config.r == data["r"] and config.task_type == "CAUSAL_LM"


@peft_fast_only
def test_inject_adapter_in_model_refuses_a_state_dict_without_adapter_keys():
    with pytest.raises(ValueError, match="no key of state_dict"):
        impl.inject_adapter_in_model(impl.LoraConfig(r=2, target_modules=["lin0"]), _mlp(),
                                     state_dict={"lin0.weight": torch.zeros(32, 16)})


def test_targeted_module_and_parameter_names_as_peft():
    """PEFT's attributes for checking what an adapter adapted (its custom-models guide prints them), in PEFT's
    order: as the adapters first targeted the modules, each adapter's in model order."""
    from moe_models import moe_pair

    names = {}
    for lib in (ref, impl):
        model = lib.get_peft_model(base_model("llama"), lib.LoraConfig(target_modules=["v_proj", "q_proj"],
                                                                       modules_to_save=["lm_head"]))
        model.add_adapter("b", lib.LoraConfig(target_modules=["o_proj", "q_proj"]))
        model.delete_adapter("b")  # (its layers stay, without adapters, in both)
        model.add_adapter("c", lib.LoraConfig(target_modules=["down_proj"]))
        names[lib.__name__] = (model.targeted_module_names, model.base_model.targeted_parameter_names)
    assert names[impl.__name__][0] == names["peft"][0]
    assert names["peft"][0][4:6] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert names[impl.__name__][1] == names["peft"][1] == []
    _, r, i = moe_pair("mixtral", "experts+attention")
    assert i.targeted_module_names == r.targeted_module_names
    assert i.targeted_parameter_names == r.targeted_parameter_names
    assert i.targeted_parameter_names


def test_lora_runtime_config_is_accepted_and_never_saved(tmp_path):
    """The LoRA guide's DoRA snippet passes runtime_config=LoraRuntimeConfig(...): how PEFT initialises DoRA on
    offloaded weights, no value changes. Neither library writes it to adapter_config.json."""
    for lib in (ref, impl):
        cfg = lib.LoraConfig(r=2, target_modules=["lin0"], use_dora=True,
                             runtime_config=lib.LoraRuntimeConfig(ephemeral_gpu_offload=False))
        lib.get_peft_model(TinyMLP(), cfg).save_pretrained(tmp_path / lib.__name__)
        saved = json.loads((tmp_path / lib.__name__ / "adapter_config.json").read_text())
        assert "runtime_config" not in saved
    cfg = impl.LoraConfig(runtime_config=impl.LoraRuntimeConfig(ephemeral_gpu_offload=True))
    assert cfg.runtime_config.ephemeral_gpu_offload and "runtime_config" not in cfg.to_dict()


def _positional(fn) -> list:
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@peft_fast_only
def test_public_signatures_take_pefts_positional_arguments():
    """Every callable peft_fast shares with PEFT (functions, classes, their public methods) takes PEFT's positional
    parameters in PEFT's order, under PEFT's names: `save_pretrained(d, True, None, False)` means
    save_embedding_layers=False in both, and keyword callers use PEFT's names."""
    import inspect

    import peft

    checked, wrong = 0, []
    for name in sorted(n for n in dir(impl) if not n.startswith("_") and hasattr(peft, n)):
        pairs = [(name, getattr(peft, name), getattr(impl, name))]
        if inspect.isclass(pairs[0][1]) and inspect.isclass(pairs[0][2]):
            pairs += [(f"{name}.{m}", getattr(pairs[0][1], m), getattr(pairs[0][2], m)) for m in dir(pairs[0][1])
                      if (not m.startswith("_") or m == "__init__") and hasattr(pairs[0][2], m)]
        for label, theirs, ours in pairs:
            a, b = _positional(theirs), _positional(ours)
            if not (callable(theirs) and callable(ours) and a and b):
                continue
            checked += 1
            n = min(len(a), len(b))
            if a[:n] != b[:n]:
                wrong.append(f"{label}: PEFT {a}, peft_fast {b}")
    assert checked > 100 and not wrong, "\n".join(wrong)


def test_save_pretrained_positional_arguments_as_pefts(tmp_path):
    for lib in (ref, impl):
        model = lib.get_peft_model(TinyMLP(), lib.LoraConfig(r=2, target_modules=["lin0"]))
        model.save_pretrained(str(tmp_path / lib.__name__), True, None, False)  # save_embedding_layers=False
        assert (tmp_path / lib.__name__ / "adapter_model.safetensors").is_file()


def test_torch_export_and_getsource_of_the_forward():
    """torch.export's default (non-strict) mode reads model.forward.__code__; inspect.getsource follows it too."""
    import inspect

    x = torch.randn(3, 16)
    for lib in (ref, impl):
        torch.manual_seed(0)
        model = lib.get_peft_model(TinyMLP(), lib.LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
        model.eval()
        exported = torch.export.export(model, (x,))
        with torch.no_grad():
            assert_close(exported.module()(x), model(x))
        assert "def forward" in inspect.getsource(model.forward)
