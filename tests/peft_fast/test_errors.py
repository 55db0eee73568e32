"""Error cases: PEFT's exception types and key words, run against PEFT too; failed calls leave the model as it was."""
import os
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import (
    AGAINST_PEFT,
    add_both,
    assert_unchanged,
    base_model,
    default_cfg,
    impl,
    inputs,
    make_pair,
    out,
    peft_fast_only,
    ref,
    snapshot,
)


def _raises_like_peft(exc_type, words, impl_call, ref_call):
    """Both libraries raise exc_type (or a subclass), with every key word in the message (case-insensitive)."""
    messages = []
    for call in (ref_call, impl_call):
        with pytest.raises(exc_type) as info:
            call()
        msg = str(info.value)
        for w in words:
            assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
        messages.append(msg)
    return messages


# ------------------------------------------------------------------------------------ adapter names
def test_set_adapter_unknown_name():
    _, r, i = make_pair("mlp")
    snap = snapshot(i)
    _raises_like_peft(ValueError, ["zzz", "not found"], lambda: i.set_adapter("zzz"), lambda: r.set_adapter("zzz"))
    assert_unchanged(i, snap)


def test_delete_adapter_unknown_name():
    _, r, i = make_pair("mlp")
    snap = snapshot(i)
    _raises_like_peft(
        ValueError, ["zzz", "does not exist"], lambda: i.delete_adapter("zzz"), lambda: r.delete_adapter("zzz")
    )
    assert_unchanged(i, snap)


def test_add_adapter_existing_name():
    _, r, i = make_pair("mlp")
    add_both(r, i, "other", "mlp")
    snap = snapshot(i)
    _raises_like_peft(
        ValueError,
        ["other", "already exists"],
        lambda: i.add_adapter("other", impl.LoraConfig(**default_cfg("mlp"))),
        lambda: r.add_adapter("other", ref.LoraConfig(**default_cfg("mlp"))),
    )
    assert_unchanged(i, snap)


def test_delete_merged_adapter():
    _, r, i = make_pair("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.merge_adapter()
        i.merge_adapter()
    snap = snapshot(i)
    # PEFT: "Cannot delete adapter(s) ['default'] while they are merged. Please unmerge them first."
    _raises_like_peft(
        ValueError,
        ["default", "merged", "unmerge"],
        lambda: i.delete_adapter("default"),
        lambda: r.delete_adapter("default"),
    )
    assert_unchanged(i, snap)
    i.unmerge_adapter()
    i.delete_adapter("default")
    assert list(i.peft_config) == []


def _mixed_pair(kind="mlp"):
    base, r, i = make_pair(kind)
    add_both(r, i, "other", kind, seed=1, r=2)
    r.eval()
    i.eval()
    return base, r, i


def test_adapter_names_unknown_name():
    _, r, i = _mixed_pair()
    x = inputs("mlp", batch=3)
    snap = snapshot(i)
    _raises_like_peft(
        ValueError,
        ["non-existing adapter", "zzz"],
        lambda: out(i, x, adapter_names=["default", "zzz", "__base__"]),
        lambda: out(r, x, adapter_names=["default", "zzz", "__base__"]),
    )
    assert_unchanged(i, snap)


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_adapter_names_wrong_length(kind):
    _, r, i = _mixed_pair(kind)
    x = inputs(kind, batch=3)
    with torch.no_grad():
        before = out(i, x)
    snap = snapshot(i)
    _raises_like_peft(
        ValueError,
        ["length", "adapter_names", "2", "3"],
        lambda: out(i, x, adapter_names=["default", "other"]),
        lambda: out(r, x, adapter_names=["default", "other"]),
    )
    assert_unchanged(i, snap)
    if not AGAINST_PEFT:
        # PEFT bug, not reproduced: its forward hooks are not removed when the forward raises, so every later
        # call keeps failing with the same error. peft_fast's model keeps working.
        with torch.no_grad():
            assert torch.equal(out(i, x), before)


def test_adapter_names_in_training_mode():
    _, r, i = _mixed_pair()
    r.train()
    i.train()
    x = inputs("mlp", batch=2)
    snap = snapshot(i)
    _raises_like_peft(
        ValueError,
        ["adapter_names", "training mode"],
        lambda: out(i, x, adapter_names=["default", "__base__"]),
        lambda: out(r, x, adapter_names=["default", "__base__"]),
    )
    assert_unchanged(i, snap)


def test_adapter_names_with_merged_adapter():
    _, r, i = _mixed_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.merge_adapter()
        i.merge_adapter()
    x = inputs("mlp", batch=2)
    _raises_like_peft(
        ValueError,
        ["adapter_names", "merged"],
        lambda: out(i, x, adapter_names=["default", "__base__"]),
        lambda: out(r, x, adapter_names=["default", "__base__"]),
    )


# ------------------------------------------------------------------------------------ merging
def test_safe_merge_with_nan_names_the_adapter():
    _, r, i = make_pair("llama", adapter_name="broken")
    for model in (r, i):
        p = dict(model.named_parameters())["base_model.model.model.layers.1.self_attn.v_proj.lora_B.broken.weight"]
        with torch.no_grad():
            p[0, 0] = float("nan")
    # PEFT: "NaNs detected in the merged weights. The adapter broken seems to be broken"
    _raises_like_peft(
        ValueError,
        ["nan", "broken"],
        lambda: i.merge_and_unload(safe_merge=True),
        lambda: r.merge_and_unload(safe_merge=True),
    )


def test_safe_merge_adapter_with_nan():
    _, r, i = make_pair("mlp", adapter_name="bad_one")
    for model in (r, i):
        with torch.no_grad():
            dict(model.named_parameters())["base_model.model.lin0.lora_A.bad_one.weight"].fill_(float("inf"))
    _raises_like_peft(
        ValueError,
        ["nan", "bad_one"],
        lambda: i.merge_adapter(safe_merge=True),
        lambda: r.merge_adapter(safe_merge=True),
    )


# ------------------------------------------------------------------------------------ configs
def test_second_adapter_with_bias():
    _, r, i = make_pair("mlp", bias="all")
    snap = snapshot(i)
    # PEFT: "LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' ..."
    _raises_like_peft(
        ValueError,
        ["only 1 adapter with bias", "'none'"],
        lambda: i.add_adapter("second", impl.LoraConfig(**default_cfg("mlp", bias="lora_only"))),
        lambda: r.add_adapter("second", ref.LoraConfig(**default_cfg("mlp", bias="lora_only"))),
    )
    assert_unchanged(i, snap)
    assert "second" not in r.peft_config  # PEFT rolls back too
    # a second adapter without bias is fine
    i.add_adapter("second", impl.LoraConfig(**default_cfg("mlp")))
    assert list(i.peft_config) == ["default", "second"]


@pytest.mark.parametrize(
    "targets, words",
    [
        (["q_prj"], ["q_prj", "not found"]),
        (r".*\.q_prj", ["q_prj", "not found"]),
    ],
)
def test_target_modules_matching_nothing(targets, words):
    kw = default_cfg("llama", target_modules=targets)
    base_i, base_r = base_model("llama"), base_model("llama")
    snap = snapshot(base_i)
    msgs = _raises_like_peft(
        ValueError,
        words,
        lambda: impl.get_peft_model(base_i, impl.LoraConfig(**kw)),
        lambda: ref.get_peft_model(base_r, ref.LoraConfig(**kw)),
    )
    assert_unchanged(base_i, snap)
    if not AGAINST_PEFT and isinstance(targets, list):
        # peft_fast also suggests the closest module names
        assert "q_proj" in msgs[1], msgs[1]


@peft_fast_only
def test_target_modules_typo_suggests_close_names():
    with pytest.raises(ValueError) as info:
        impl.get_peft_model(base_model("gpt2"), impl.LoraConfig(target_modules=["c_atn"], fan_in_fan_out=True))
    assert "c_attn" in str(info.value)
    with pytest.raises(ValueError) as info:
        impl.get_peft_model(base_model("mlp"), impl.LoraConfig(target_modules=["lin_0"]))
    assert "lin0" in str(info.value)


def test_target_modules_layers_to_transform_matching_nothing():
    kw = default_cfg("llama", layers_to_transform=[5], layers_pattern="layers")
    _raises_like_peft(
        ValueError,
        ["layers_to_transform"],
        lambda: impl.get_peft_model(base_model("llama"), impl.LoraConfig(**kw)),
        lambda: ref.get_peft_model(base_model("llama"), ref.LoraConfig(**kw)),
    )


def test_all_targets_excluded():
    kw = default_cfg("llama", exclude_modules=list(default_cfg("llama")["target_modules"]))
    _raises_like_peft(
        ValueError,
        ["exclude_modules"],
        lambda: impl.get_peft_model(base_model("llama"), impl.LoraConfig(**kw)),
        lambda: ref.get_peft_model(base_model("llama"), ref.LoraConfig(**kw)),
    )


def test_rank_zero():
    kw = default_cfg("mlp", r=0)
    base_i = base_model("mlp")
    snap = snapshot(base_i)
    _raises_like_peft(
        ValueError,
        ["`r` should be a positive integer", "0"],
        lambda: impl.get_peft_model(base_i, impl.LoraConfig(**kw)),
        lambda: ref.get_peft_model(base_model("mlp"), ref.LoraConfig(**kw)),
    )
    if not AGAINST_PEFT:
        assert_unchanged(base_i, snap)


def test_unknown_init_lora_weights():
    kw = default_cfg("mlp", init_lora_weights="foo")
    _raises_like_peft(
        ValueError,
        ["Unknown initialization", "foo"],
        lambda: impl.get_peft_model(base_model("mlp"), impl.LoraConfig(**kw)),
        lambda: ref.get_peft_model(base_model("mlp"), ref.LoraConfig(**kw)),
    )


def test_unknown_bias():
    kw = default_cfg("mlp", bias="some")
    _raises_like_peft(
        NotImplementedError,
        ["bias", "some"],
        lambda: impl.get_peft_model(base_model("mlp"), impl.LoraConfig(**kw)),
        lambda: ref.get_peft_model(base_model("mlp"), ref.LoraConfig(**kw)),
    )


def test_layers_pattern_without_layers_to_transform():
    _raises_like_peft(
        ValueError,
        ["layers_pattern", "layers_to_transform"],
        lambda: impl.LoraConfig(target_modules=["q_proj"], layers_pattern="layers"),
        lambda: ref.LoraConfig(target_modules=["q_proj"], layers_pattern="layers"),
    )


def test_lora_bias_with_gaussian_init():
    _raises_like_peft(
        ValueError,
        ["lora_bias", "init_lora_weights"],
        lambda: impl.LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights="gaussian"),
        lambda: ref.LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights="gaussian"),
    )


def test_layers_to_transform_with_regex_target_modules():
    _raises_like_peft(
        ValueError,
        ["layers_to_transform", "str"],
        lambda: impl.LoraConfig(target_modules=".*q_proj", layers_to_transform=[0]),
        lambda: ref.LoraConfig(target_modules=".*q_proj", layers_to_transform=[0]),
    )


def test_save_pretrained_errors(tmp_path):
    _, r, i = make_pair("mlp")
    f = tmp_path / "a_file"
    f.write_text("x")
    _raises_like_peft(
        ValueError, ["should be a directory"], lambda: i.save_pretrained(str(f)), lambda: r.save_pretrained(str(f))
    )
    _raises_like_peft(
        ValueError,
        ["selected_adapters", "zz"],
        lambda: i.save_pretrained(str(tmp_path / "i"), selected_adapters=["zz"]),
        lambda: r.save_pretrained(str(tmp_path / "r"), selected_adapters=["zz"]),
    )


# ------------------------------------------------------------------------------------ broken adapter files
def _truncate(d):
    p = d / "adapter_model.safetensors"
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _no_weights(d):
    os.remove(d / "adapter_model.safetensors")


def _no_config(d):
    os.remove(d / "adapter_config.json")


def _bad_json(d):
    (d / "adapter_config.json").write_text('{"r": 4, "target_modules": [')


def _wrong_shape(d):
    sd = load_file(d / "adapter_model.safetensors")
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd[k] = torch.zeros(3, 64)
    save_file(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})


def _extra_key(d):
    sd = load_file(d / "adapter_model.safetensors")
    sd["base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})


def _renamed_keys(d):
    sd = load_file(d / "adapter_model.safetensors")
    sd = {k.replace("q_proj", "zz_proj"): v for k, v in sd.items()}
    save_file(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})


# case -> (corruption, accepted exception types, key words in the message, PEFT raises too, PEFT keeps the model)
# What PEFT 0.21.2 does: truncated file -> safetensors' SafetensorError; missing weights -> it tries the Hub and
# raises HFValidationError (a ValueError); missing config -> ValueError "Can't find 'adapter_config.json' at ...";
# bad JSON -> json.JSONDecodeError (a ValueError); wrong shape -> RuntimeError "size mismatch for ..." after it has
# already injected the adapter; keys matching no layer -> silently ignored (no error at all).
BROKEN = {
    "truncated": (_truncate, (Exception,), [], True, False),
    "no_weights": (_no_weights, (ValueError, OSError), ["{dir}"], True, False),
    "no_config": (_no_config, (ValueError,), ["adapter_config.json", "{dir}"], True, True),
    "bad_json": (_bad_json, (ValueError,), [], True, True),
    "wrong_shape": (_wrong_shape, (RuntimeError, ValueError), ["q_proj"], True, False),
    "extra_key": (_extra_key, (ValueError, KeyError, RuntimeError), ["zz_proj"], False, False),
    "renamed_keys": (_renamed_keys, (ValueError, KeyError, RuntimeError), ["zz_proj"], False, False),
}


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    _, r, _ = make_pair("llama")
    r.save_pretrained(d)
    return d


def _broken_dir(saved_adapter, tmp_path, case):
    d = tmp_path / case
    shutil.copytree(saved_adapter, d)
    BROKEN[case][0](d)
    return d


def _check_error(info, case, d):
    _, types, words, _, _ = BROKEN[case]
    assert isinstance(info.value, types), f"{type(info.value)} is not one of {types}"
    msg = str(info.value)
    for w in words:
        w = w.format(dir=str(d))
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("case", list(BROKEN))
def test_from_pretrained_broken_adapter(case, saved_adapter, tmp_path):
    _, _, _, peft_raises, peft_keeps = BROKEN[case]
    d = _broken_dir(saved_adapter, tmp_path, case)
    if AGAINST_PEFT and not peft_raises:
        pytest.skip("PEFT loads this without error (peft_fast raises)")
    base = base_model("llama")
    snap = snapshot(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            impl.PeftModel.from_pretrained(base, str(d))
    _check_error(info, case, d)
    if AGAINST_PEFT and not peft_keeps:
        return  # PEFT has already injected LoRA layers into the passed model
    assert_unchanged(base, snap)


@pytest.mark.parametrize("case", list(BROKEN))
def test_load_adapter_broken_adapter(case, saved_adapter, tmp_path):
    _, _, _, peft_raises, peft_keeps = BROKEN[case]
    d = _broken_dir(saved_adapter, tmp_path, case)
    if AGAINST_PEFT and not peft_raises:
        pytest.skip("PEFT loads this without error (peft_fast raises)")
    _, r, i = make_pair("llama")
    i.eval()
    x = inputs("llama")
    with torch.no_grad():
        before = out(i, x)
    snap = snapshot(i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            i.load_adapter(str(d), adapter_name="other")
    _check_error(info, case, d)
    if AGAINST_PEFT and not peft_keeps:
        return  # PEFT leaves the half-loaded adapter "other" in the model
    assert_unchanged(i, snap)
    with torch.no_grad():
        assert torch.equal(out(i, x), before)
    # and the model still takes a good adapter under that name afterwards
    i.load_adapter(str(saved_adapter), adapter_name="other")
    assert "other" in i.peft_config


def test_load_adapter_wrong_shape_message_like_peft(saved_adapter, tmp_path):
    d = _broken_dir(saved_adapter, tmp_path, "wrong_shape")
    _, r, i = make_pair("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msgs = _raises_like_peft(
            (RuntimeError, ValueError),
            ["q_proj", "shape"],
            lambda: i.load_adapter(str(d), adapter_name="other"),
            lambda: r.load_adapter(str(d), adapter_name="other"),
        )
    assert re.search(r"\b3\b", msgs[1]) and "64" in msgs[1]
