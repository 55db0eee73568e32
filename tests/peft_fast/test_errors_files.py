"""Broken adapter files (truncated, missing, bad JSON, wrong shapes, extra or renamed keys): PEFT's exception types
and key words, run against PEFT too; a failed load leaves the model as it was."""
import os
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import (
    AGAINST_PEFT,
    assert_unchanged,
    base_model,
    impl,
    inputs,
    make_pair,
    out,
    peft_fast_only,
    raises_like_peft,
    snapshot,
)

_raises_like_peft = raises_like_peft


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


@peft_fast_only
def test_messages_point_to_the_fix(tmp_path):
    """A folder holding only subfolder adapters names subfolder=; a model holding PEFT's own layers says so; the
    closest-name hint lists the model's layers, not the parts of adapters already there."""
    import peft

    model = impl.get_peft_model(base_model("llama"), impl.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", impl.LoraConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    with pytest.raises(FileNotFoundError, match=r"subfolders \(other\).*subfolder=<name>"):
        impl.PeftModel.from_pretrained(base_model("llama"), str(tmp_path))
    with pytest.raises(ValueError, match="no_such") as err:
        model.add_adapter("third", impl.LoraConfig(r=2, target_modules=["no_such"]))
    assert "base_layer" not in str(err.value) and "'default'" not in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_peft_layers = peft.get_peft_model(base_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Hugging Face PEFT layer"):
        impl.get_peft_model(with_peft_layers.base_model.model, impl.LoraConfig(r=2, target_modules=["q_proj"]))
