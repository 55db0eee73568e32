"""Outputs and gradients match PEFT, in eval and train mode, with and without LoRA dropout."""
import pytest
import torch

from tiny_models import (
    CONFIG_CASES,
    add_both,
    assert_close,
    case_id,
    inputs,
    loss_of,
    make_pair,
    out,
    set_active,
)

IDS = [case_id(c) for c in CONFIG_CASES]


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _check_grads(ref_model, impl_model):
    rg, ig = _grads(ref_model), _grads(impl_model)
    assert set(rg) == set(ig)
    assert any(g is not None and g.abs().sum() > 0 for g in rg.values())
    for n in rg:
        if rg[n] is None:
            assert ig[n] is None or torch.count_nonzero(ig[n]) == 0, n
            continue
        assert ig[n] is not None, f"no gradient for {n}"
        assert_close(ig[n], rg[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("case", CONFIG_CASES, ids=IDS)
def test_eval_outputs(case):
    kind, kw = case
    base, ref_model, impl_model = make_pair(kind, **kw)
    ref_model.eval()
    impl_model.eval()
    x = inputs(kind)
    with torch.no_grad():
        expected = out(ref_model, x)
        got = out(impl_model, x)
        base.eval()
        base_out = out(base, x)
    # the adapter is not a no-op (init_lora_weights=False gives a random B)
    assert not torch.allclose(expected, base_out, atol=1e-4)
    assert_close(got, expected)


@pytest.mark.parametrize("case", CONFIG_CASES, ids=IDS)
def test_train_outputs_and_gradients_no_dropout(case):
    kind, kw = case
    _, ref_model, impl_model = make_pair(kind, **kw)
    ref_model.train()
    impl_model.train()
    x = inputs(kind)
    torch.manual_seed(123)
    ref_loss = loss_of(ref_model, x)
    torch.manual_seed(123)
    impl_loss = loss_of(impl_model, x)
    assert_close(impl_loss, ref_loss)
    ref_loss.backward()
    impl_loss.backward()
    _check_grads(ref_model, impl_model)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mlp"])
def test_eval_outputs_with_dropout(kind):
    _, ref_model, impl_model = make_pair(kind, lora_dropout=0.5)
    ref_model.eval()
    impl_model.eval()
    x = inputs(kind)
    with torch.no_grad():
        assert_close(out(impl_model, x), out(ref_model, x))
        # eval is deterministic
        assert torch.equal(out(impl_model, x), out(impl_model, x))


DROPOUT_CASES = [
    ("llama", {}),
    ("llama", {"target_modules": "all-linear", "use_rslora": True}),
    ("llama", {"use_dora": True}),
    ("gpt2", {}),  # base-model dropouts (0.1) interleave with LoRA dropouts
    ("gpt2", {"lora_bias": True}),
    ("mlp", {}),
    ("mlp", {"modules_to_save": ["lin2"], "bias": "lora_only"}),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[case_id(c) for c in DROPOUT_CASES])
def test_train_with_dropout_same_rng_order(case):
    """The LoRA dropout draws from the global torch RNG in PEFT's order: same seed, same masks, same outputs."""
    kind, kw = case
    _, ref_model, impl_model = make_pair(kind, lora_dropout=0.3, **kw)
    ref_model.train()
    impl_model.train()
    x = inputs(kind)
    for seed in (5, 6):
        torch.manual_seed(seed)
        ref_loss = loss_of(ref_model, x)
        torch.manual_seed(seed)
        impl_loss = loss_of(impl_model, x)
        assert_close(impl_loss, ref_loss, atol=1e-6, rtol=1e-6)
        ref_model.zero_grad()
        impl_model.zero_grad()
        ref_loss.backward()
        impl_loss.backward()
        _check_grads(ref_model, impl_model)

    # dropout is really active in train mode: two seeds give different outputs
    with torch.no_grad():
        torch.manual_seed(5)
        a = out(impl_model, x)
        torch.manual_seed(6)
        b = out(impl_model, x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_train_with_dropout_logits_exact(kind):
    _, ref_model, impl_model = make_pair(kind, lora_dropout=0.25)
    ref_model.train()
    impl_model.train()
    x = inputs(kind)
    with torch.no_grad():
        torch.manual_seed(77)
        expected = out(ref_model, x)
        after_ref = torch.rand(8)
        torch.manual_seed(77)
        got = out(impl_model, x)
        after_impl = torch.rand(8)
    assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # same number of RNG draws as PEFT
    assert torch.equal(after_impl, after_ref)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mlp"])
def test_two_active_adapters(kind):
    _, ref_model, impl_model = make_pair(kind)
    add_both(ref_model, impl_model, "other", kind, seed=1, r=2, lora_alpha=5)
    set_active(ref_model, ["default", "other"])
    set_active(impl_model, ["default", "other"])
    assert list(impl_model.active_adapters) == list(ref_model.active_adapters)
    ref_model.eval()
    impl_model.eval()
    x = inputs(kind)
    with torch.no_grad():
        both = out(ref_model, x)
        assert_close(out(impl_model, x), both)
        set_active(ref_model, "default")
        only_default = out(ref_model, x)
    assert not torch.allclose(both, only_default, atol=1e-4)

    # gradients flow to both active adapters, as in PEFT
    set_active(ref_model, ["default", "other"])
    ref_model.train()
    impl_model.train()
    torch.manual_seed(0)
    loss_of(ref_model, x).backward()
    torch.manual_seed(0)
    loss_of(impl_model, x).backward()
    _check_grads(ref_model, impl_model)


def test_inputs_with_attention_mask_and_labels():
    _, ref_model, impl_model = make_pair("llama")
    ref_model.eval()
    impl_model.eval()
    x = inputs("llama")
    mask = torch.ones_like(x["input_ids"])
    mask[0, :2] = 0
    with torch.no_grad():
        r = ref_model(input_ids=x["input_ids"], attention_mask=mask, labels=x["input_ids"])
        i = impl_model(input_ids=x["input_ids"], attention_mask=mask, labels=x["input_ids"])
    assert_close(i.logits, r.logits)
    assert_close(i.loss, r.loss)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_of_one_drops_the_adapter_in_training(use_dora):
    """lora_dropout=1.0, which PEFT accepts: in training the adapter adds nothing, in eval everything."""
    base, ref_model, impl_model = make_pair("mlp", lora_dropout=1.0, use_dora=use_dora)
    x = inputs("mlp")
    for model in (ref_model, impl_model):
        model.train()
    torch.manual_seed(0)
    ref_loss = loss_of(ref_model, x)
    torch.manual_seed(0)
    impl_loss = loss_of(impl_model, x)
    assert_close(impl_loss, ref_loss)
    with torch.no_grad():
        assert_close(out(impl_model, x), out(base, x))
        assert_close(out(impl_model.eval(), x), out(ref_model.eval(), x))
