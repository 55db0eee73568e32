"""VeRA against PEFT 0.21.2: parameters, seeded init and the projections drawn from `projection_prng_key`, forward
and gradients (train with dropout, eval, no-grad, bf16, several active adapters), files both ways (with and without
the projections), biases, configs, mixed batches.

Merging, adapter management, 4-bit bases and refusals: test_parity_vera_adapters.py.
"""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ia3_vera_pairs import VeraConfig, add_both, configs, grads, make_pair
from tiny_models import (
    AGAINST_PEFT, assert_close, assert_same_params, assert_same_state, base_model, impl, inputs, loss_of, out,
    peft_fast_only, raises_like_peft, ref, set_active,
)

KINDS = ["llama", "gpt2", "mlp"]


def _forward_backward(model, x, seed=3):
    torch.manual_seed(seed)  # dropouts (VeRA's, GPT-2's) draw from the global RNG: the same draws on both sides
    loss = loss_of(model, x)
    loss.backward()
    return loss


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_parameters_projections_and_seeded_init(kind, init):
    _, r, i = make_pair("vera", kind, copy_weights_over=False, init_weights=init)
    assert_same_params(r, i)
    # Λ_b, Λ_d (randn from the global RNG, per layer, in PEFT's order) and every copy of the projections, which come
    # from projection_prng_key alone, sized for the largest target.
    assert_same_state(r, i, atol=0, rtol=0)
    assert i.get_nb_trainable_parameters() == r.get_nb_trainable_parameters()
    assert set(i.base_model.vera_A) == {"default"}


def test_projections_depend_on_the_key_only():
    _, r, _ = make_pair("vera", "llama", copy_weights_over=False, seed=1)
    _, _, i = make_pair("vera", "llama", copy_weights_over=False, seed=2)
    _, _, other = make_pair("vera", "llama", copy_weights_over=False, projection_prng_key=7)
    assert torch.equal(i.base_model.vera_A["default"], r.base_model.vera_A["default"])
    assert torch.equal(i.base_model.vera_B["default"], r.base_model.vera_B["default"])
    assert not torch.equal(other.base_model.vera_A["default"], r.base_model.vera_A["default"])
    assert tuple(r.base_model.vera_A["default"].shape) == (8, 128)  # in_max: down_proj's 128 inputs


def test_bfloat16_model_rounds_as_peft():
    base = base_model("llama").to(torch.bfloat16)
    _, r, i = make_pair("vera", "llama", base=base, copy_weights_over=False, init_weights=True)
    assert i.base_model.vera_A["default"].dtype == torch.float32
    assert_same_state(r, i, atol=0, rtol=0)  # Λ_d = bf16(0.1) and bf16-rounded projections, upcast, as PEFT's
    x = inputs("llama")
    assert_close(out(i, x).float(), out(r, x).float(), atol=1e-2, rtol=1e-2)
    with torch.no_grad():  # the folded path: float32 delta, summed with the bf16 base output in float32
        assert_close(out(i.eval(), x).float(), out(r.eval(), x).float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kind", KINDS)
def test_train_forward_and_gradients(kind, dropout):
    _, r, i = make_pair("vera", kind, vera_dropout=dropout)
    r.train(), i.train()
    x = inputs(kind)
    assert_close(_forward_backward(i, x), _forward_backward(r, x))
    rg, ig = grads(r), grads(i)
    assert set(rg) == set(ig) and rg
    for n in rg:
        assert_close(ig[n], rg[n], msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_forward_with_and_without_autograd(kind):
    _, r, i = make_pair("vera", kind, vera_dropout=0.1)
    r.eval(), i.eval()
    x = inputs(kind)
    assert_close(out(i, x), out(r, x))
    with torch.no_grad():  # peft_fast: Λ folded into the projections, one LoRA op per layer
        assert_close(out(i, x), out(r, x))
        perturbed = next(p for n, p in i.named_parameters() if "vera_lambda_d" in n)
        perturbed.mul_(3.0)  # an in-place change of a vector: the folded weights follow it
        next(p for n, p in r.named_parameters() if "vera_lambda_d" in n).mul_(3.0)
        assert_close(out(i, x), out(r, x))


def test_several_active_adapters_add_up():
    _, r, i = make_pair("vera", "llama")
    add_both("vera", r, i, "other", "llama", target_modules=["q_proj", "k_proj"])
    for m in (r, i):
        set_active(m, ["default", "other"])
    r.train(), i.train()
    x = inputs("llama")
    assert_close(_forward_backward(i, x), _forward_backward(r, x))
    rg, ig = grads(r), grads(i)
    assert set(rg) == set(ig) and any(".other" in n for n in rg)
    for n in rg:
        assert_close(ig[n], rg[n], msg=n)


# --- files ----------------------------------------------------------------------------------------------------------
def _read(path):
    with open(os.path.join(path, "adapter_config.json")) as f:
        data = json.load(f)
    data.pop("peft_version")
    return {k: sorted(v) if isinstance(v, list) else v for k, v in data.items()}


@pytest.mark.parametrize("kw", [{}, {"save_projection": False}, {"bias": "vera_only"}, {"bias": "all"},
                                {"modules_to_save": ["lin2"], "layers_to_transform": None}],
                         ids=["plain", "no-projection", "vera_only", "bias-all", "modules_to_save"])
def test_files_both_ways(tmp_path, kw):
    kind = "mlp"
    _, r, i = make_pair("vera", kind, **kw)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert _read(tmp_path / "impl") == _read(tmp_path / "ref")
    rw, iw = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ref", "impl"))
    assert set(iw) == set(rw) and all(torch.equal(iw[k], rw[k]) for k in rw)
    assert ("base_model.vera_A" in iw) == kw.get("save_projection", True)
    x = inputs(kind)
    r.eval()
    want = out(r, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ref = impl.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "ref"))
        from_impl = ref.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "impl"))
    if kw.get("bias", "none") == "none":  # a trained bias is saved, but the loading base model's differs here
        assert_close(out(from_ref, x), want)
        assert_close(out(from_impl, x), want)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_files_from_transformers_models(tmp_path, kind):
    _, r, i = make_pair("vera", kind)
    i.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = ref.PeftModel.from_pretrained(base_model(kind), str(tmp_path))
    r.eval()
    x = inputs(kind)
    assert_close(out(loaded, x), out(r, x))


def test_loading_without_saved_projections_warns_as_peft(tmp_path):
    _, r, _ = make_pair("vera", "mlp", save_projection=False)
    r.save_pretrained(tmp_path)
    for lib in (ref, impl):
        with pytest.warns(UserWarning, match="relying on PRNG"):
            lib.PeftModel.from_pretrained(base_model("mlp"), str(tmp_path))


def test_missing_projections_are_refused(tmp_path):
    _, r, _ = make_pair("vera", "mlp")
    r.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v for k, v in load_file(path).items() if "vera_" not in k.split(".")[1]}, str(path))
    raises_like_peft(ValueError, ["vera_A"], lambda: impl.PeftModel.from_pretrained(base_model("mlp"), str(tmp_path)),
                     lambda: ref.PeftModel.from_pretrained(base_model("mlp"), str(tmp_path)))


def test_config_fields_are_peft_fields():
    r_cfg, i_cfg = configs("vera", "llama")
    assert set(i_cfg.to_dict()) | {"peft_version", "auto_mapping"} == set(r_cfg.to_dict()) | {"auto_mapping"}
    raises_like_peft(TypeError, ["exclude_modules"], lambda: VeraConfig(exclude_modules=["q_proj"]),
                     lambda: ref.VeraConfig(exclude_modules=["q_proj"]))


# --- mixed batches --------------------------------------------------------------------------------------------------
def test_peft_ignores_adapter_names_for_vera():
    _, r, i = make_pair("vera", "llama")
    add_both("vera", r, i, "other", "llama")
    r.eval()
    x = inputs("llama")
    assert torch.equal(out(r, x, adapter_names=["other", "default", "other"]), out(r, x))


@peft_fast_only
def test_mixed_batches_are_refused():
    # Deliberate difference: PEFT runs the active adapter on every sample whatever adapter_names says (test above);
    # peft_fast refuses rather than return another adapter's output.
    _, _, i = make_pair("vera", "llama")
    i.eval()
    with pytest.raises(ValueError, match="mixed adapter batches"):
        out(i, inputs("llama"), adapter_names=["default"] * 3)


def test_trainable_biases_as_peft():
    for bias in ("vera_only", "all"):
        _, r, i = make_pair("vera", "mlp", bias=bias)
        assert_same_params(r, i)
        assert AGAINST_PEFT or any(p.requires_grad for n, p in i.named_parameters() if n.endswith(".bias"))
