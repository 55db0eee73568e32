"""save_pretrained / from_pretrained / load_adapter: same files as PEFT, and adapters move both ways."""
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tiny_models import (
    add_both,
    assert_close,
    base_model,
    case_id,
    default_cfg,
    impl,
    inputs,
    make_pair,
    out,
    ref,
    set_active,
)

IGNORED_FILES: set = set()  # the model card (README.md) is compared in test_model_card.py

SAVE_CASES = [
    ("llama", {}),
    ("llama", {"target_modules": "all-linear", "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"o_proj": 3}}),
    ("llama", {"modules_to_save": ["lm_head"], "lora_dropout": 0.1}),
    ("llama", {"use_dora": True, "task_type": "CAUSAL_LM"}),
    ("gpt2", {"lora_bias": True}),
    ("gpt2", {"bias": "all"}),
    ("mlp", {"bias": "lora_only", "use_rslora": True}),
    ("mlp", {"modules_to_save": ["lin2"]}),
]


def tree(d):
    files = set()
    for root, _, names in os.walk(d):
        for n in names:
            if n not in IGNORED_FILES:
                files.add(os.path.relpath(os.path.join(root, n), d))
    return files


def read_config(path):
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg.pop("peft_version", None)
    if isinstance(cfg.get("target_modules"), list):  # PEFT stores a set: the order is arbitrary
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


def assert_same_adapter_dir(impl_dir, ref_dir, fmt="safetensors"):
    assert tree(impl_dir) == tree(ref_dir)
    ic, rc = read_config(impl_dir), read_config(ref_dir)
    # every field written is a PEFT field with PEFT's value (the full key set is checked in its own test below)
    assert set(ic) <= set(rc), f"fields PEFT does not write: {sorted(set(ic) - set(rc))}"
    diff = {k: (ic[k], rc[k]) for k in ic if ic[k] != rc[k]}
    assert not diff, f"adapter_config.json differs (impl, PEFT): {diff}"
    if fmt == "safetensors":
        fname = "adapter_model.safetensors"
        iw, rw = load_file(os.path.join(impl_dir, fname)), load_file(os.path.join(ref_dir, fname))
        with safe_open(os.path.join(impl_dir, fname), "pt") as fi, safe_open(os.path.join(ref_dir, fname), "pt") as fr:
            # Deliberate difference: peft_fast keeps a copy of the config in the metadata, so that a save interrupted
            # between its two files is refused at load (PEFT reads files with it as it reads its own).
            impl_meta = dict(fi.metadata())
            impl_meta.pop("peft_fast_config", None)
            assert impl_meta == fr.metadata()
    else:
        fname = "adapter_model.bin"
        iw = torch.load(os.path.join(impl_dir, fname), weights_only=True)
        rw = torch.load(os.path.join(ref_dir, fname), weights_only=True)
    assert set(iw) == set(rw), f"only PEFT: {sorted(set(rw) - set(iw))}  only impl: {sorted(set(iw) - set(rw))}"
    for k in rw:
        assert iw[k].dtype == rw[k].dtype, k
        assert torch.equal(iw[k], rw[k]), k


@pytest.mark.parametrize("case", SAVE_CASES, ids=[case_id(c) for c in SAVE_CASES])
def test_save_pretrained_writes_peft_files(case, tmp_path):
    kind, kw = case
    _, ref_model, impl_model = make_pair(kind, **kw)
    ref_model.save_pretrained(tmp_path / "ref")
    impl_model.save_pretrained(tmp_path / "impl")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= tree(tmp_path / "impl")
    assert_same_adapter_dir(tmp_path / "impl", tmp_path / "ref")
    # saving does not change the model: still trainable, same mode
    assert impl_model.peft_config["default"].inference_mode == ref_model.peft_config["default"].inference_mode
    assert any(p.requires_grad for p in impl_model.parameters())


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_adapter_config_json_has_every_peft_field(kind, tmp_path):
    """PEFT writes every LoraConfig field (megatron_config, eva_config, ... as null): so must we."""
    _, ref_model, impl_model = make_pair(kind)
    ref_model.save_pretrained(tmp_path / "ref")
    impl_model.save_pretrained(tmp_path / "impl")
    ic, rc = read_config(tmp_path / "impl"), read_config(tmp_path / "ref")
    assert set(ic) == set(rc), f"only PEFT: {sorted(set(rc) - set(ic))}  only impl: {sorted(set(ic) - set(rc))}"
    assert ic == rc


def test_save_non_default_adapters_in_subdirectories(tmp_path):
    _, ref_model, impl_model = make_pair("llama")
    add_both(ref_model, impl_model, "other", "llama", seed=1, r=2, target_modules=["k_proj"])
    add_both(ref_model, impl_model, "third", "llama", seed=2, r=3)
    ref_model.save_pretrained(tmp_path / "ref")
    impl_model.save_pretrained(tmp_path / "impl")
    assert tree(tmp_path / "impl") == tree(tmp_path / "ref") == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        os.path.join("other", "adapter_config.json"),
        os.path.join("other", "adapter_model.safetensors"),
        os.path.join("third", "adapter_config.json"),
        os.path.join("third", "adapter_model.safetensors"),
    }
    assert_same_adapter_dir(tmp_path / "impl", tmp_path / "ref")  # checks the default adapter's files
    for name in ("other", "third"):
        assert_same_adapter_dir(tmp_path / "impl" / name, tmp_path / "ref" / name)


def test_save_selected_adapters(tmp_path):
    _, ref_model, impl_model = make_pair("mlp")
    add_both(ref_model, impl_model, "other", "mlp", seed=1, r=2)
    ref_model.save_pretrained(tmp_path / "ref", selected_adapters=["other"])
    impl_model.save_pretrained(tmp_path / "impl", selected_adapters=["other"])
    assert tree(tmp_path / "impl") == tree(tmp_path / "ref") == {
        "README.md",
        os.path.join("other", "adapter_config.json"),
        os.path.join("other", "adapter_model.safetensors"),
    }
    assert_same_adapter_dir(tmp_path / "impl" / "other", tmp_path / "ref" / "other")


def test_save_without_safetensors(tmp_path):
    _, ref_model, impl_model = make_pair("gpt2")
    ref_model.save_pretrained(tmp_path / "ref", safe_serialization=False)
    impl_model.save_pretrained(tmp_path / "impl", safe_serialization=False)
    assert "adapter_model.bin" in tree(tmp_path / "impl")
    assert "adapter_model.safetensors" not in tree(tmp_path / "impl")
    assert_same_adapter_dir(tmp_path / "impl", tmp_path / "ref", fmt="bin")


def test_saved_keys_have_no_adapter_name_and_peft_prefix(tmp_path):
    _, _, impl_model = make_pair("llama", adapter_name="mine")
    impl_model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "mine" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any("mine" in k for k in keys)
    assert not any("base_layer" in k for k in keys)


# ------------------------------------------------------------------------------------------ loading
LOAD_CASES = [
    ("llama", {}),
    ("llama", {"modules_to_save": ["lm_head"], "use_rslora": True, "rank_pattern": {"v_proj": 2}}),
    ("llama", {"use_dora": True}),
    ("gpt2", {"lora_bias": True, "bias": "all"}),
    ("mlp", {"target_modules": "lin.*", "alpha_pattern": {"lin2": 1}}),
]


def _eval_out(model, kind):
    model.eval()
    with torch.no_grad():
        return out(model, inputs(kind))


@pytest.mark.parametrize("case", LOAD_CASES, ids=[case_id(c) for c in LOAD_CASES])
def test_peft_adapter_loads_into_impl(case, tmp_path):
    kind, kw = case
    base, ref_model, _ = make_pair(kind, **kw)
    ref_model.save_pretrained(tmp_path)
    expected = _eval_out(ref_model, kind)

    loaded = impl.PeftModel.from_pretrained(base_model(kind), str(tmp_path))
    ref_loaded = ref.PeftModel.from_pretrained(base_model(kind), str(tmp_path))
    assert isinstance(loaded, impl.PeftModel)
    # default is_trainable=False: frozen and in eval mode, like PEFT. (PEFT quirk: with bias="all" the base
    # biases, lora_B biases included, stay requires_grad=True even then; the LoRA weights are always frozen.)
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in ref_loaded.named_parameters()
    }
    assert not any(
        p.requires_grad
        for n, p in loaded.named_parameters()
        if ("lora_" in n or "modules_to_save" in n) and not n.endswith(".bias")
    )
    assert not any(m.training for m in loaded.modules())
    assert loaded.peft_config["default"].inference_mode is True
    assert set(loaded.state_dict()) == set(ref_loaded.state_dict())
    assert_close(out_no_grad(loaded, kind), expected)


def out_no_grad(model, kind):
    with torch.no_grad():
        return out(model, inputs(kind))


@pytest.mark.parametrize("case", LOAD_CASES, ids=[case_id(c) for c in LOAD_CASES])
def test_impl_adapter_loads_into_peft(case, tmp_path):
    kind, kw = case
    _, ref_model, impl_model = make_pair(kind, **kw)
    impl_model.save_pretrained(tmp_path)
    expected = _eval_out(ref_model, kind)
    assert_close(_eval_out(impl_model, kind), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no missing/unexpected keys warnings
        loaded = ref.PeftModel.from_pretrained(base_model(kind), str(tmp_path))
    assert_close(out_no_grad(loaded, kind), expected)
    # and round trip impl -> impl
    again = impl.PeftModel.from_pretrained(base_model(kind), str(tmp_path))
    assert_close(out_no_grad(again, kind), expected)


def test_from_pretrained_is_trainable_matches_peft(tmp_path):
    _, ref_model, _ = make_pair("llama", modules_to_save=["lm_head"])
    ref_model.save_pretrained(tmp_path)
    r = ref.PeftModel.from_pretrained(base_model("llama"), str(tmp_path), is_trainable=True)
    i = impl.PeftModel.from_pretrained(base_model("llama"), str(tmp_path), is_trainable=True)
    ri = {n: p.requires_grad for n, p in r.named_parameters()}
    assert {n: p.requires_grad for n, p in i.named_parameters()} == ri
    assert any(ri.values())
    assert i.training == r.training
    assert i.peft_config["default"].inference_mode is r.peft_config["default"].inference_mode is False
    assert i.get_nb_trainable_parameters() == r.get_nb_trainable_parameters()


def test_from_pretrained_named_adapter_and_subdirectory(tmp_path):
    _, ref_model, impl_model = make_pair("mlp")
    add_both(ref_model, impl_model, "other", "mlp", seed=3, r=3, lora_alpha=7)
    ref_model.save_pretrained(tmp_path)
    set_active(ref_model, "other")
    expected = _eval_out(ref_model, "mlp")
    loaded = impl.PeftModel.from_pretrained(base_model("mlp"), str(tmp_path / "other"), adapter_name="other")
    assert list(loaded.peft_config) == ["other"]
    assert loaded.active_adapter == "other"
    assert any(".lora_A.other." in n for n, _ in loaded.named_parameters())
    assert_close(out_no_grad(loaded, "mlp"), expected)


@pytest.mark.parametrize("direction", ["peft_to_impl", "impl_to_peft"])
@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter(direction, is_trainable, tmp_path):
    kind = "llama"
    _, ref_model, impl_model = make_pair(kind)
    # a second adapter with other weights, saved by one library, loaded by the other under a new name
    _, src_ref, src_impl = make_pair(kind, seed=9, r=2, target_modules=["k_proj", "o_proj"])
    src = src_ref if direction == "peft_to_impl" else src_impl
    src.save_pretrained(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model.load_adapter(str(tmp_path), adapter_name="other", is_trainable=is_trainable)
        impl_model.load_adapter(str(tmp_path), adapter_name="other", is_trainable=is_trainable)
    # load_adapter does not activate the new adapter
    assert impl_model.active_adapter == ref_model.active_adapter == "default"
    assert sorted(impl_model.peft_config) == ["default", "other"]
    assert impl_model.peft_config["other"].inference_mode is ref_model.peft_config["other"].inference_mode
    assert {n: p.requires_grad for n, p in impl_model.named_parameters()} == {
        n: p.requires_grad for n, p in ref_model.named_parameters()
    }
    assert impl_model.training == ref_model.training
    assert_close(_eval_out(impl_model, kind), _eval_out(ref_model, kind))
    set_active(ref_model, "other")
    set_active(impl_model, "other")
    expected = _eval_out(ref_model, kind)
    assert_close(_eval_out(impl_model, kind), expected)
    assert_close(_eval_out(src_ref, kind), expected)


def test_from_pretrained_accepts_a_peft_lora_config(tmp_path):
    _, ref_model, _ = make_pair("mlp", r=3)
    ref_model.save_pretrained(tmp_path)
    expected = _eval_out(ref_model, "mlp")
    config = ref.LoraConfig.from_pretrained(str(tmp_path))
    loaded = impl.PeftModel.from_pretrained(base_model("mlp"), str(tmp_path), config=config)
    assert_close(out_no_grad(loaded, "mlp"), expected)


def test_get_peft_model_accepts_a_peft_lora_config(tmp_path):
    base = base_model("gpt2")
    kw = default_cfg("gpt2", lora_dropout=0.1, bias="lora_only")
    torch.manual_seed(0)
    r = ref.get_peft_model(base_model("gpt2"), ref.LoraConfig(**kw))
    torch.manual_seed(0)
    i = impl.get_peft_model(base, ref.LoraConfig(**kw))
    assert isinstance(i, impl.PeftModel)
    assert {n: p.shape for n, p in i.named_parameters()} == {n: p.shape for n, p in r.named_parameters()}
    i.load_state_dict(r.state_dict())
    assert_close(_eval_out(i, "gpt2"), _eval_out(r, "gpt2"))
    i.save_pretrained(tmp_path / "impl")
    r.save_pretrained(tmp_path / "ref")
    assert_same_adapter_dir(tmp_path / "impl", tmp_path / "ref")
