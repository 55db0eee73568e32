"""merge_adapter / unmerge_adapter / merge_and_unload / unload give PEFT's weights and outputs."""
import warnings

import pytest
import torch

from tiny_models import (
    add_both,
    assert_close,
    assert_same_state,
    base_model,
    case_id,
    copy_weights,
    impl,
    inputs,
    make_pair,
    out,
    perturb_magnitudes,
    ref,
    set_active,
)

MERGE_CASES = [
    ("llama", {}),
    ("llama", {"target_modules": "all-linear", "use_rslora": True, "rank_pattern": {"o_proj": 2}}),
    ("llama", {"use_dora": True}),
    ("llama", {"modules_to_save": ["lm_head"]}),
    ("gpt2", {"lora_bias": True}),  # Conv1D, fan_in_fan_out: the delta is transposed
    ("gpt2", {"bias": "all", "use_dora": True}),
    ("mlp", {"lora_bias": True, "alpha_pattern": {"lin1": 2}}),
    ("mlp", {"modules_to_save": ["lin2"]}),
]
IDS = [case_id(c) for c in MERGE_CASES]


def _out(model, kind):
    with torch.no_grad():
        return out(model, inputs(kind))


def _eval_pair(kind, **kw):
    base, r, i = make_pair(kind, **kw)
    if kw.get("use_dora"):  # fresh magnitudes make m / norm = 1: a DoRA merge would equal a LoRA merge
        assert perturb_magnitudes(r, i) > 0
    r.eval()
    i.eval()
    base.eval()
    return base, r, i


def _merged_adapters(model):
    """merged adapters per adapted layer (PEFT's model status says 'irregular' when modules_to_save is used)."""
    return {st.name: sorted(st.merged_adapters) for st in model.get_layer_status()}


def _assert_merged(r, i, names):
    lr, li = _merged_adapters(r), _merged_adapters(i)
    assert li == lr
    assert any(v == names for v in li.values())
    assert i.get_model_status().merged_adapters == r.get_model_status().merged_adapters


@pytest.mark.parametrize("case", MERGE_CASES, ids=IDS)
def test_merge_unmerge_adapter(case):
    kind, kw = case
    _, r, i = _eval_pair(kind, **kw)
    before_state = {k: v.clone() for k, v in i.state_dict().items()}
    unmerged_out = _out(r, kind)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.merge_adapter()
        i.merge_adapter()
    # merged base weights are PEFT's merged base weights (LoRA weights kept alongside)
    assert_same_state(r, i, atol=1e-6, rtol=1e-5)
    _assert_merged(r, i, ["default"])
    merged_out = _out(r, kind)
    assert_close(_out(i, kind), merged_out)
    assert_close(merged_out, unmerged_out, atol=1e-4, rtol=1e-4)
    # the weights really changed
    assert any(not torch.equal(before_state[k], v) for k, v in i.state_dict().items() if "base_layer" in k)

    r.unmerge_adapter()
    i.unmerge_adapter()
    assert not any(_merged_adapters(i).values())
    assert i.get_model_status().merged_adapters == r.get_model_status().merged_adapters == []
    assert_same_state(r, i, atol=1e-6, rtol=1e-5)
    for k, v in i.state_dict().items():
        assert_close(v, before_state[k], atol=1e-5, rtol=1e-5, msg=k)
    assert_close(_out(i, kind), unmerged_out)


@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("case", MERGE_CASES, ids=IDS)
def test_merge_and_unload(case, safe_merge):
    kind, kw = case
    base, r, i = _eval_pair(kind, **kw)
    expected_out = _out(r, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rm = r.merge_and_unload(safe_merge=safe_merge)
        im = i.merge_and_unload(safe_merge=safe_merge)
    # the plain base model type, with the base model's parameter names, and no PEFT wrapper left
    assert type(im) is type(base)
    assert not isinstance(im, (impl.PeftModel, ref.PeftModel))
    assert set(im.state_dict()) == set(base.state_dict())
    assert [type(m) for m in im.modules()] == [type(m) for m in base.modules()]
    assert_same_state(rm, im, atol=1e-6, rtol=1e-5)
    assert_close(_out(im, kind), _out(rm, kind))
    assert_close(_out(im, kind), expected_out, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_out(im, kind), _out(base, kind), atol=1e-4)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_lora_bias_over_a_16bit_base_merges_and_unmerges_as_peft(safe_merge):
    """float32 lora_B biases (autocast_adapter_dtype) into a bf16 bias: the sum is rounded to bf16 once."""
    cfg = dict(r=4, target_modules=["lin0", "lin1"], lora_bias=True, init_lora_weights=False)
    models = []
    for lib in (ref, impl):
        torch.manual_seed(0)
        models.append(lib.get_peft_model(base_model("mlp").to(torch.bfloat16), lib.LoraConfig(**cfg)))
    r, i = models
    with torch.no_grad():
        for n, p in r.named_parameters():
            if n.endswith("lora_B.default.bias"):
                p.copy_(torch.randn_like(p) * 0.37)
    copy_weights(r, i)

    def biases(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.bias")}

    for step in ("merge", "unmerge"):
        for model in (r, i):
            if step == "merge":
                model.merge_adapter(safe_merge=safe_merge)
            else:
                model.unmerge_adapter()
        got, want = biases(i), biases(r)
        assert got.keys() == want.keys() and want
        for n in want:
            assert torch.equal(got[n], want[n]), (step, n)


def test_unmerge_with_nothing_merged_warns_as_peft():
    _, r, i = _eval_pair("mlp")
    for model in (r, i):
        with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
            model.unmerge_adapter()


def test_merge_and_unload_selected_adapter():
    base, r, i = _eval_pair("llama")
    add_both(r, i, "other", "llama", seed=4, r=2, lora_alpha=6, target_modules=["k_proj", "v_proj"])
    set_active(r, "other")
    expected = _out(r, "llama")
    set_active(r, "default")
    set_active(i, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rm = r.merge_and_unload(adapter_names=["other"])
        im = i.merge_and_unload(adapter_names=["other"])
    assert type(im) is type(base)
    assert_same_state(rm, im, atol=1e-6, rtol=1e-5)
    assert_close(_out(im, "llama"), expected, atol=1e-4, rtol=1e-4)


def test_merge_and_unload_two_adapters():
    base, r, i = _eval_pair("gpt2")
    add_both(r, i, "other", "gpt2", seed=4, r=2, lora_alpha=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rm = r.merge_and_unload(adapter_names=["default", "other"])
        im = i.merge_and_unload(adapter_names=["default", "other"])
    assert_same_state(rm, im, atol=1e-6, rtol=1e-5)
    assert_close(_out(im, "gpt2"), _out(rm, "gpt2"))


def test_merge_adapter_selected_names():
    _, r, i = _eval_pair("mlp")
    add_both(r, i, "other", "mlp", seed=5, r=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.merge_adapter(["other"])
        i.merge_adapter(["other"])
    _assert_merged(r, i, ["other"])
    assert_same_state(r, i, atol=1e-6, rtol=1e-5)
    assert_close(_out(i, "mlp"), _out(r, "mlp"))
    r.unmerge_adapter()
    i.unmerge_adapter()
    assert_same_state(r, i, atol=1e-6, rtol=1e-5)
    assert_close(_out(i, "mlp"), _out(r, "mlp"))


@pytest.mark.parametrize("case", MERGE_CASES, ids=IDS)
def test_unload_restores_base(case):
    kind, kw = case
    base, r, i = _eval_pair(kind, **kw)
    im = i.unload()
    rm = r.unload()
    assert type(im) is type(base)
    assert set(im.state_dict()) == set(base.state_dict())
    assert_same_state(rm, im, atol=0, rtol=0)
    for k, v in base.state_dict().items():
        assert torch.equal(im.state_dict()[k], v), k
    assert_close(_out(im, kind), _out(base, kind))


def test_merged_model_forward_then_unmerge_in_train_mode():
    """Merging, training-mode forward and unmerging keep parity (PEFT allows merge in train mode)."""
    _, r, i = make_pair("llama", lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.merge_adapter()
        i.merge_adapter()
    x = inputs("llama")
    torch.manual_seed(0)
    ro = out(r, x)
    torch.manual_seed(0)
    io = out(i, x)
    assert_close(io, ro)
    r.unmerge_adapter()
    i.unmerge_adapter()
    assert_same_state(r, i, atol=1e-6, rtol=1e-5)


def test_merge_twice_warns_and_does_not_double_merge():
    _, r, i = _eval_pair("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.merge_adapter()
        i.merge_adapter()
        r.merge_adapter()
        i.merge_adapter()
    _assert_merged(r, i, ["default"])
    assert_same_state(r, i, atol=1e-6, rtol=1e-5)
