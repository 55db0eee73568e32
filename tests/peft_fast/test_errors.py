"""Error cases: PEFT's exception types and key words, run against PEFT too; failed calls leave the model as it was."""
import warnings

import pytest
import torch

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
    raises_like_peft,
    snapshot,
)

_raises_like_peft = raises_like_peft



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
