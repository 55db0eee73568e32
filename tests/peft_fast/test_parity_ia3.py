"""(IA)³ against PEFT 0.21.2: parameters and seeded init, configs and their defaults, forward and gradients (train,
eval, no-grad, bf16, several active adapters), files both ways, mixed batches and config errors.

Merging, adapter management, 4-bit bases and all-or-nothing refusals: test_parity_ia3_adapters.py.
"""
import json
import os
import warnings

import pytest
import torch

from ia3_vera_pairs import IA3Config, add_both, configs, grads, make_pair
from tiny_models import (
    AGAINST_PEFT, assert_close, assert_same_params, assert_same_state, base_model, impl, inputs, loss_of, out,
    peft_fast_only, raises_like_peft, ref, set_active,
)

KINDS = ["llama", "gpt2", "mlp"]


def _forward_backward(model, x, seed=3):
    torch.manual_seed(seed)  # GPT-2's own dropouts draw from the global RNG: same draws on both sides
    loss = loss_of(model, x)
    loss.backward()
    return loss


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_parameters_and_seeded_init(kind, init):
    _, r, i = make_pair("ia3", kind, copy_weights_over=False, init_ia3_weights=init)
    assert_same_params(r, i)
    assert_same_state(r, i, atol=0, rtol=0)  # randn drawn per layer in PEFT's order, or ones
    assert i.get_nb_trainable_parameters() == r.get_nb_trainable_parameters()
    shapes = {n: tuple(p.shape) for n, p in i.named_parameters() if "ia3_l" in n}
    assert shapes and all(s[0] == 1 or s[1] == 1 for s in shapes.values())


def test_model_type_defaults_fill_targets_and_feedforward():
    _, r, i = make_pair("ia3", "llama", target_modules=None, feedforward_modules=None)
    assert set(i.peft_config["default"].target_modules) == set(r.peft_config["default"].target_modules)
    assert set(i.peft_config["default"].feedforward_modules) == {"down_proj"}
    assert_same_params(r, i)
    x = inputs("llama")
    assert_close(out(i, x), out(r, x))


def test_feedforward_modules_match_as_plain_suffixes_or_a_regex():
    # PEFT's rule for a list is `key.endswith(name)` with no dot: "proj" makes every *_proj a feedforward layer
    # (as a target it matches nothing: targets match whole dotted names).
    for ff in (["proj"], r".*\.(q_proj|down_proj)"):
        _, r, i = make_pair("ia3", "llama", target_modules=["q_proj", "down_proj", "v_proj", "proj"],
                            feedforward_modules=ff)
        assert_same_params(r, i)
        x = inputs("llama")
        assert_close(out(i, x), out(r, x))


@pytest.mark.parametrize("kind", KINDS)
def test_train_forward_and_gradients(kind):
    _, r, i = make_pair("ia3", kind)
    r.train(), i.train()
    x = inputs(kind)
    assert_close(_forward_backward(i, x), _forward_backward(r, x))
    rg, ig = grads(r), grads(i)
    assert set(rg) == set(ig) and rg
    for n in rg:
        assert_close(ig[n], rg[n], msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_forward_with_and_without_autograd(kind):
    _, r, i = make_pair("ia3", kind)
    r.eval(), i.eval()
    x = inputs(kind)
    assert_close(out(i, x), out(r, x))
    with torch.no_grad():  # peft_fast scales the base output in place here
        assert_close(out(i, x), out(r, x))
        assert_close(out(i, x), out(r, x))  # again, from the layers' kept plans


def test_several_active_adapters_multiply():
    _, r, i = make_pair("ia3", "llama")
    add_both("ia3", r, i, "other", "llama", target_modules=["q_proj", "down_proj"])
    for m in (r, i):
        set_active(m, ["default", "other"])
    x = inputs("llama")
    r.train(), i.train()
    assert_close(_forward_backward(i, x), _forward_backward(r, x))
    rg, ig = grads(r), grads(i)
    assert set(rg) == set(ig) and any(".other" in n for n in rg)
    for n in rg:
        assert_close(ig[n], rg[n], msg=n)


def test_bfloat16_model_keeps_float32_vectors():
    base = base_model("llama").to(torch.bfloat16)
    _, r, i = make_pair("ia3", "llama", base=base, copy_weights_over=False)
    assert {p.dtype for n, p in i.named_parameters() if "ia3_l" in n} == {torch.float32}
    assert_same_state(r, i, atol=0, rtol=0)  # randn rounded through bf16, then upcast, as PEFT does
    x = inputs("llama")
    assert_close(out(i, x).float(), out(r, x).float(), atol=1e-2, rtol=1e-2)


# --- files ----------------------------------------------------------------------------------------------------------
def _read(path):
    with open(os.path.join(path, "adapter_config.json")) as f:
        data = json.load(f)
    data.pop("peft_version")
    return {k: sorted(v) if isinstance(v, list) else v for k, v in data.items()}


@pytest.mark.parametrize("extra", [{}, {"modules_to_save": ["lm_head"], "task_type": "CAUSAL_LM"},
                                   {"feedforward_modules": r".*down_proj", "target_modules": r".*(k_proj|down_proj)"}],
                         ids=["plain", "modules_to_save", "regexes"])
def test_files_both_ways(tmp_path, extra):
    from safetensors.torch import load_file

    _, r, i = make_pair("ia3", "llama", **extra)
    x = inputs("llama")
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert _read(tmp_path / "impl") == _read(tmp_path / "ref")
    rw, iw = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ref", "impl"))
    assert set(iw) == set(rw) and all(torch.equal(iw[k], rw[k]) for k in rw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ref = impl.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / "ref"))
        from_impl = ref.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / "impl"))
    r.eval()
    want = out(r, x)
    assert_close(out(from_ref, x), want)
    assert_close(out(from_impl, x), want)


@pytest.mark.parametrize("kind", ["gpt2", "mlp"])
def test_files_from_conv1d_and_plain_models(tmp_path, kind):
    _, r, i = make_pair("ia3", kind)
    i.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = ref.PeftModel.from_pretrained(base_model(kind), str(tmp_path))
    assert loaded.peft_config["default"].fan_in_fan_out is (kind == "gpt2")
    r.eval()
    x = inputs(kind)
    assert_close(out(loaded, x), out(r, x))


def test_config_fields_are_peft_fields():
    r_cfg, i_cfg = configs("ia3", "llama")
    keys = set(i_cfg.to_dict()) | {"peft_version", "auto_mapping"}
    assert keys == set(r_cfg.to_dict()) | {"auto_mapping"}
    if not AGAINST_PEFT:
        with pytest.raises(TypeError):  # not a field of PEFT's IA3Config either
            IA3Config(target_modules=["q_proj"], feedforward_modules=[], layers_to_transform=[0])


# --- mixed batches and errors -------------------------------------------------------------------------------------
def test_peft_ignores_adapter_names_for_ia3():
    _, r, i = make_pair("ia3", "llama")
    add_both("ia3", r, i, "other", "llama")
    r.eval()
    x = inputs("llama")
    assert torch.equal(out(r, x, adapter_names=["other", "default", "other"]), out(r, x))


@peft_fast_only
def test_mixed_batches_are_refused():
    # Deliberate difference: PEFT silently runs the active adapter on every sample (test above), which returns the
    # wrong adapter's output for the samples that asked for another; peft_fast refuses the call instead.
    _, _, i = make_pair("ia3", "llama")
    i.eval()
    with pytest.raises(ValueError, match="mixed adapter batches"):
        out(i, inputs("llama"), adapter_names=["default"] * 3)


def test_config_errors_match_peft():
    raises_like_peft(ValueError, ["feedforward_modules", "subset"],
                     lambda: IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"]),
                     lambda: ref.IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"]))
    r_cfg, i_cfg = configs("ia3", "mlp", feedforward_modules=None)
    raises_like_peft(ValueError, ["feedforward_modules"], lambda: impl.get_peft_model(base_model("mlp"), i_cfg),
                     lambda: ref.get_peft_model(base_model("mlp"), r_cfg))
    r_cfg, i_cfg = configs("ia3", "mlp", target_modules=None)
    raises_like_peft(ValueError, ["target_modules"], lambda: impl.get_peft_model(base_model("mlp"), i_cfg),
                     lambda: ref.get_peft_model(base_model("mlp"), r_cfg))
