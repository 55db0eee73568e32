"""Several adapters: add / set / disable / delete, status reports and attribute passthrough, step by step vs PEFT."""
import dataclasses
import warnings

import pytest
import torch

from tiny_models import (
    AGAINST_PEFT,
    add_both,
    assert_close,
    assert_same_params,
    base_model,
    copy_weights,
    default_cfg,
    impl,
    impl_patch,
    inputs,
    loss_of,
    make_pair,
    out,
    peft_fast_only,
    ref,
    set_active,
)


def _out(model, kind):
    with torch.no_grad():
        return out(model, inputs(kind))


def _rg(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _same_state(r, i, kind):
    assert i.active_adapter == r.active_adapter
    assert list(i.active_adapters) == list(r.active_adapters)
    assert list(i.peft_config) == list(r.peft_config)
    assert_same_params(r, i)  # names, shapes and requires_grad
    assert_close(_out(i, kind), _out(r, kind))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mlp"])
def test_adapter_lifecycle(kind):
    base, r, i = make_pair(kind)
    base.eval()
    base_out = _out(base, kind)
    r.eval()
    i.eval()
    default_out = _out(r, kind)
    _same_state(r, i, kind)

    # add a second adapter: not active, frozen, outputs unchanged
    add_both(r, i, "other", kind, seed=3, r=2, lora_alpha=6, lora_dropout=0.1)
    # PEFT quirk: add_adapter on a model in eval mode creates its nn.Dropout in training mode (outputs become
    # random until the next .eval()); we do not test that bug, we call eval() again.
    r.eval()
    i.eval()
    _same_state(r, i, kind)
    assert_close(_out(i, kind), default_out)

    # switch to it
    set_active(r, "other")
    set_active(i, "other")
    _same_state(r, i, kind)
    other_out = _out(i, kind)
    assert not torch.allclose(other_out, default_out, atol=1e-4)

    # disable_adapter(): the base model's outputs inside, the adapter's after
    with r.disable_adapter(), i.disable_adapter():
        assert_close(_out(i, kind), base_out)
        assert _rg(i) == _rg(r)
    assert _rg(i) == _rg(r)
    assert_close(_out(i, kind), other_out)

    # a third adapter given as a peft.LoraConfig
    kw = default_cfg(kind, r=3, lora_alpha=3)
    torch.manual_seed(11)
    r.add_adapter("third", ref.LoraConfig(**kw))
    torch.manual_seed(11)
    i.add_adapter("third", ref.LoraConfig(**kw))
    copy_weights(r, i)
    set_active(r, "third")
    set_active(i, "third")
    _same_state(r, i, kind)

    # delete the active adapter: PEFT picks the new active adapter(s); we must pick the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.delete_adapter("third")
        i.delete_adapter("third")
    assert not any(".third." in n for n, _ in i.named_parameters())
    _same_state(r, i, kind)

    # delete an inactive adapter
    set_active(r, "default")
    set_active(i, "default")
    r.delete_adapter("other")
    i.delete_adapter("other")
    assert not any(".other." in n for n, _ in i.named_parameters())
    _same_state(r, i, kind)
    assert_close(_out(i, kind), default_out)


def test_delete_last_adapter():
    _, r, i = make_pair("mlp")
    r.delete_adapter("default")
    i.delete_adapter("default")
    assert list(i.peft_config) == list(r.peft_config) == []
    assert list(i.active_adapters) == list(r.active_adapters)
    assert_same_params(r, i)
    assert not any("lora_" in n for n, _ in i.named_parameters())
    # (PEFT quirk, not tested: a forward after deleting the last adapter raises KeyError: 'default' in PEFT.)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_set_adapter_moves_trainability_and_gradients(kind):
    _, r, i = make_pair(kind)
    add_both(r, i, "other", kind, seed=2, r=2)
    assert _rg(i) == _rg(r)
    set_active(r, "other")
    set_active(i, "other")
    assert _rg(i) == _rg(r)
    assert any(v for n, v in _rg(i).items() if ".other." in n)
    r.train()
    i.train()
    x = inputs(kind)
    torch.manual_seed(0)
    loss_of(r, x).backward()
    torch.manual_seed(0)
    loss_of(i, x).backward()
    rg = {n: p.grad for n, p in r.named_parameters()}
    for n, p in i.named_parameters():
        if rg[n] is None:
            assert p.grad is None or not torch.any(p.grad), n
        else:
            assert_close(p.grad, rg[n], atol=1e-5, rtol=1e-4, msg=n)
    assert all(p.grad is None for n, p in i.named_parameters() if ".default." in n)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_disable_adapter_while_merged(kind):
    base, r, i = make_pair(kind)
    base.eval()
    r.eval()
    i.eval()
    adapter_out = _out(r, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.merge_adapter()
        i.merge_adapter()
        with r.disable_adapter(), i.disable_adapter():
            ro = _out(r, kind)
            assert_close(_out(i, kind), ro)
            assert_close(ro, _out(base, kind), atol=1e-5, rtol=1e-5)
        assert [s.merged_adapters for s in i.get_layer_status()] == [s.merged_adapters for s in r.get_layer_status()]
        assert_close(_out(i, kind), _out(r, kind))
        assert_close(_out(i, kind), adapter_out, atol=1e-4, rtol=1e-4)


def test_disable_adapter_restores_on_exception():
    base, r, i = make_pair("mlp")
    i.eval()
    before = _out(i, "mlp")
    with pytest.raises(RuntimeError, match="boom"):
        with i.disable_adapter():
            raise RuntimeError("boom")
    assert_close(_out(i, "mlp"), before)


def test_disable_adapter_on_inference_model_keeps_peft_requires_grad(tmp_path):
    """PEFT quirk: leaving disable_adapter() re-runs set_adapter, which marks the active adapter trainable."""
    _, r, _ = make_pair("mlp")
    r.save_pretrained(tmp_path)
    rl = ref.PeftModel.from_pretrained(base_model("mlp"), str(tmp_path))
    il = impl.PeftModel.from_pretrained(base_model("mlp"), str(tmp_path))
    assert _rg(il) == _rg(rl)
    with rl.disable_adapter(), il.disable_adapter():
        assert _rg(il) == _rg(rl)
    assert _rg(il) == _rg(rl)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_layer_and_model_status(kind):
    _, r, i = make_pair(kind, modules_to_save=["lm_head"] if kind == "llama" else ["lin2"])
    add_both(r, i, "other", kind, seed=1, r=2, target_modules=default_cfg(kind)["target_modules"][:1])
    set_active(r, "other")
    set_active(i, "other")

    def fields(st):
        return {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}

    rl, il = r.get_layer_status(), i.get_layer_status()
    assert len(il) == len(rl)
    for a, b in zip(sorted(il, key=lambda s: s.name), sorted(rl, key=lambda s: s.name)):
        fb = fields(b)
        assert {k: getattr(a, k) for k in fb} == fb
    rs, is_ = r.get_model_status(), i.get_model_status()
    fr = fields(rs)
    assert {k: getattr(is_, k) for k in fr} == fr
    with r.disable_adapter(), i.disable_adapter():
        assert i.get_model_status().enabled == r.get_model_status().enabled is False


def test_get_base_model_and_attribute_passthrough():
    base = base_model("llama")
    kw = default_cfg("llama")
    i = impl.get_peft_model(base, impl.LoraConfig(**kw))
    r = ref.get_peft_model(base_model("llama"), ref.LoraConfig(**kw))
    # in place, like PEFT: the wrapped model is the object that was passed in
    assert i.get_base_model() is base
    assert type(i.get_base_model()) is type(r.get_base_model())
    assert i.config is base.config
    assert i.config.hidden_size == 64
    assert i.generation_config is base.generation_config
    assert i.get_input_embeddings() is base.get_input_embeddings()
    assert i.dtype == r.dtype
    assert i.device == r.device
    with pytest.raises(AttributeError):
        i.this_attribute_does_not_exist  # noqa: B018


def test_patch_alias():
    base = base_model("gpt2")
    kw = default_cfg("gpt2")
    torch.manual_seed(0)
    r = ref.get_peft_model(base_model("gpt2"), ref.LoraConfig(**kw))
    torch.manual_seed(0)
    p = impl_patch(base, impl.LoraConfig(**kw))
    assert isinstance(p, impl.PeftModel)
    assert p.get_base_model() is base
    assert_same_params(r, p)
    copy_weights(r, p)
    r.eval()
    p.eval()
    assert_close(_out(p, "gpt2"), _out(r, "gpt2"))
    # and with a peft.LoraConfig and an adapter name
    q = impl_patch(base_model("gpt2"), ref.LoraConfig(**kw), adapter_name="named")
    assert list(q.peft_config) == ["named"] and q.active_adapter == "named"


@peft_fast_only
def test_patch_is_get_peft_model():
    assert callable(impl.patch)
    base = base_model("mlp")
    p = impl.patch(base, impl.LoraConfig(**default_cfg("mlp")))
    assert type(p) is type(impl.get_peft_model(base_model("mlp"), impl.LoraConfig(**default_cfg("mlp"))))


@peft_fast_only
def test_set_adapter_accepts_a_list():
    """PEFT's PeftModel.set_adapter only takes a str (a list raises TypeError: unhashable); peft_fast also takes a
    list, with the same effect as PEFT's LoraModel.set_adapter(list)."""
    _, r, i = make_pair("llama")
    add_both(r, i, "other", "llama", seed=2, r=2)
    r.base_model.set_adapter(["default", "other"])
    i.set_adapter(["default", "other"])
    assert list(i.active_adapters) == ["default", "other"]
    assert _rg(i) == _rg(r)
    r.eval()
    i.eval()
    assert_close(_out(i, "llama"), _out(r, "llama"))


def test_add_adapter_to_wrapped_model_peft_config_fields():
    _, r, i = make_pair("llama", lora_alpha=12, lora_dropout=0.1, rank_pattern={"q_proj": 2})
    for name in ("r", "lora_alpha", "lora_dropout", "rank_pattern", "bias", "fan_in_fan_out", "init_lora_weights"):
        assert getattr(i.peft_config["default"], name) == getattr(r.peft_config["default"], name), name
    assert i.peft_config["default"].peft_type == r.peft_config["default"].peft_type


def test_active_peft_config():
    _, r, i = make_pair("mlp")
    add_both(r, i, "other", "mlp", seed=2, r=2)
    set_active(r, "other")
    set_active(i, "other")
    assert i.active_peft_config.r == r.active_peft_config.r == 2
    if AGAINST_PEFT:
        assert i.active_peft_config is i.peft_config["other"]
