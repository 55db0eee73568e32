"""AdaLoRA against PEFT 0.21.2 (tiny Llama, GPT-2's Conv1D, an MLP, TinyConv's Conv2d): parameters and init,
forward and gradients (lora_dropout and GPT-2's dropouts in PEFT's RNG order), where the orthogonal penalty is
added to the loss, files both ways, merging, several adapters, mixed batches, refusals. Rank allocation:
test_adalora_allocation.py; 4-bit bases: test_parity_oft_adalora_4bit.py."""
import copy
import warnings

import pytest
import torch
from lycoris_pairs import assert_eval_matches, assert_same_files, assert_train_step_matches
from oft_adalora_pairs import AdaLoraConfig, add_both, base_for, build, cfg, pair, x_for
from tiny_models import assert_close, assert_same_params, assert_same_state, assert_unchanged, base_model, impl, \
    out, peft_fast_only, raises_like_peft, ref, set_active, snapshot

CASES = [
    ("llama", {}),
    ("llama", {"init_lora_weights": False, "lora_alpha": 16}),
    ("llama", {"target_modules": None, "init_r": 3}),  # PEFT's default targets for llama
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["o_proj"], "bias": "lora_only"}),
    ("llama", {"layers_to_transform": [1], "layers_pattern": "layers", "modules_to_save": ["lm_head"]}),
    ("llama", {"lora_alpha": 0}),  # a zero alpha scales by the rank
    ("gpt2", {"lora_dropout": 0.2}),  # Conv1D (fan_in_fan_out); GPT-2's own dropouts and lora_dropout drawn in order
    ("mlp", {"bias": "all", "lora_dropout": 0.1}),
    ("conv", {"lora_dropout": 0.1}),  # a 3x3 Conv2d with padding, a 1x1 one with stride, a Linear head
]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'default'}" for k, kw in CASES]
SAME = {"peft_version": None, "auto_mapping": None}  # PEFT's own bookkeeping: the files test them


def _same_params(r, i) -> None:
    """PEFT's parameter table, except that `ranknum` never trains here (test_ranknum_stays_frozen_in_16bit_models)."""
    if next(p for n, p in r.named_parameters() if ".ranknum." in n).requires_grad:
        for n, p in r.named_parameters():
            if ".ranknum." in n:
                p.requires_grad_(False)
    assert_same_params(r, i)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameters_and_init_match_peft(case):
    """Same names, shapes, trainability and count; under one seed the same initial values (PEFT draws A, E, B and
    ranknum with randn, then E = 0 and A, B ~ N(0, 0.02) with init_lora_weights)."""
    kind, kw = case
    _, r, i = build("adalora", kind, **kw)
    _same_params(r, i)
    assert i.get_nb_trainable_parameters() == r.get_nb_trainable_parameters()
    assert_same_state(r, i, atol=0, rtol=0)
    assert [s.module_type for s in i.get_layer_status()] == [s.module_type for s in r.get_layer_status()]
    mine, peft = i.peft_config["default"].to_dict() | SAME, r.peft_config["default"].to_dict() | SAME
    assert mine == {k: peft[k] for k in mine}  # the keys PEFT writes beyond these (LoRA's options): the files tests


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_gradients_match_peft(case):
    kind, kw = case
    _, r, i = pair("adalora", kind, **kw)
    x = x_for(kind)
    assert_train_step_matches(kind, r, i, x, steps=2)
    assert_eval_matches(kind, r, i, x)
    with torch.no_grad():  # the inference cache in use: a second call gives the same
        assert_close(out(i, x), out(r, x))


def test_orthogonal_penalty_where_peft_adds_it():
    """PEFT adds orth_reg_weight · mean ‖AAᵀ - I‖, ‖BᵀB - I‖ to the loss in AdaLoraModel.forward, which its task
    models (task_type set) call and its plain PeftModel does not; `base_model(...)` adds it either way."""
    x = x_for("llama")
    plain_loss = {}
    for task in (None, "CAUSAL_LM"):
        _, r, i = pair("adalora", "llama", task_type=task, orth_reg_weight=0.3)
        for m in (r, i):
            m.train()
        losses = [m(**x, labels=x["input_ids"]).loss for m in (r, i)]
        assert_close(losses[1], losses[0], msg=str(task))
        direct = [m.base_model(**x, labels=x["input_ids"]).loss for m in (r, i)]
        assert_close(direct[1], direct[0], msg=str(task))
        plain_loss[task] = (losses[1].item(), direct[1].item())
        for m, loss in zip((r, i), direct):
            loss.backward()
        grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (r, i)]
        assert grads[0].keys() == grads[1].keys()
        for n in grads[0]:
            assert_close(grads[1][n], grads[0][n], msg=n)
    assert plain_loss[None][0] < plain_loss[None][1]  # the penalty is positive: only the direct call has it
    assert plain_loss["CAUSAL_LM"][0] == pytest.approx(plain_loss["CAUSAL_LM"][1])


@peft_fast_only
def test_penalty_of_a_model_loaded_for_inference(tmp_path):
    """Loaded without is_trainable there is no trainable adapter to regularize: the loss is the model's. PEFT 0.21.2
    fails there with an AttributeError (no trainable_adapter_name)."""
    _, r, _ = pair("adalora", "llama", task_type="CAUSAL_LM")
    r.save_pretrained(tmp_path)
    x = x_for("llama")
    with pytest.raises(AttributeError, match="trainable_adapter_name"):
        ref.PeftModel.from_pretrained(base_model("llama"), str(tmp_path))(**x, labels=x["input_ids"])
    loaded = impl.PeftModel.from_pretrained(base_model("llama"), str(tmp_path))
    with torch.no_grad():
        loss = loaded(**x, labels=x["input_ids"]).loss
        r.eval()
        r.base_model.peft_config["default"].orth_reg_weight = 0.0
        assert_close(loss, r(**x, labels=x["input_ids"]).loss)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "conv"])
def test_files_both_ways(kind, tmp_path):
    """Two adapters (the second in inference mode, as PEFT requires) saved by each library: the same files; each
    library loads the other's with equal outputs."""
    _, r, i = pair("adalora", kind)
    add_both("adalora", r, i, "second", kind, seed=2, inference_mode=True, init_r=3, lora_alpha=4)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    for sub in ("", "second"):
        assert_same_files(tmp_path / "impl" / sub, tmp_path / "ref" / sub)
    x = x_for(kind)
    r.eval()
    with torch.no_grad():
        want = {"default": out(r, x)}
        r.set_adapter("second")
        want["second"] = out(r, x)
    for src in ("ref", "impl"):
        for lib in (impl, ref):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = lib.PeftModel.from_pretrained(base_for(kind), str(tmp_path / src))
                loaded.load_adapter(str(tmp_path / src / "second"), adapter_name="second")
            with torch.no_grad():
                assert_close(out(loaded, x), want["default"], msg=f"{src} -> {lib.__name__}")
                loaded.set_adapter("second")
                assert_close(out(loaded, x), want["second"], msg=f"{src} -> {lib.__name__}")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "conv"])
def test_merge_unmerge_and_unload(kind):
    _, r, i = pair("adalora", kind)
    add_both("adalora", r, i, "other", kind, seed=1, inference_mode=True)
    x = x_for(kind)
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        want = out(r, x)
        for m in (r, i):
            m.merge_adapter()
        assert_same_state(r, i)
        assert_close(out(i, x), want)
        for m in (r, i):
            m.unmerge_adapter()
        assert_same_state(r, i)
        for m in (r, i):
            m.merge_adapter(adapter_names=["default", "other"], safe_merge=True)
        assert_same_state(r, i)
        for m in (r, i):
            m.unmerge_adapter()
        assert_same_state(r.merge_and_unload(adapter_names=["other"]), i.merge_and_unload(adapter_names=["other"]))
    _, r, i = pair("adalora", kind)
    assert_same_state(r.unload(), i.unload(), atol=0, rtol=0)


def test_several_adapters_set_disable_delete():
    _, r, i = pair("adalora", "llama")
    add_both("adalora", r, i, "other", "llama", seed=3, inference_mode=True, target_modules=["q_proj", "k_proj"])
    x = x_for("llama")
    for names in (["default", "other"], "other", "default"):
        for m in (r, i):
            set_active(m, names)
        assert_eval_matches("llama", r, i, x)
    for m in (r, i):
        m.train()
    assert_train_step_matches("llama", r, i, x)
    for m in (r, i):
        m.eval()
    with torch.no_grad(), r.disable_adapter(), i.disable_adapter():
        assert_close(out(i, x), base_model("llama")(**x).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (r, i):
            m.delete_adapter("other")
    assert i.active_adapters == r.active_adapters == ["default"]
    assert_eval_matches("llama", r, i, x)


def test_refusals_like_peft():
    """A second trainable adapter, a second adapter with bias, add_weighted_adapter, Conv1d targets."""
    _, r, i = pair("adalora", "llama", bias="all")
    snap = snapshot(i)
    for kw, words in (({}, ["only 1 trainable adapter"]), ({"bias": "lora_only", "inference_mode": True},
                                                             ["only 1 adapter with bias"])):
        raises_like_peft(ValueError, words, lambda: i.add_adapter("b", AdaLoraConfig(**cfg("adalora", "llama", **kw))),
                         lambda: r.add_adapter("b", ref.AdaLoraConfig(**cfg("adalora", "llama", **kw))))
    raises_like_peft(TypeError, ["does not support add_weighted_adapter"],
                     lambda: i.base_model.add_weighted_adapter(["default"], [1.0], "w"),
                     lambda: r.base_model.add_weighted_adapter(["default"], [1.0], "w"))
    if impl is not ref:
        assert_unchanged(i, snap)
    conv1d = cfg("adalora", "conv", target_modules=["conv2"])
    raises_like_peft(ValueError, ["is not supported", "Conv2d"],
                     lambda: impl.get_peft_model(base_for("conv"), AdaLoraConfig(**conv1d)),
                     lambda: ref.get_peft_model(base_for("conv"), ref.AdaLoraConfig(**conv1d)))


def test_mixed_batch_fails_in_peft():
    """PEFT 0.21.2's AdaLoRA layers hand `adapter_names` on to the base layer, which fails (peft_fast runs each
    sample through its adapter: test_mixed_batch_rows_get_their_own_adapter)."""
    _, r, _ = pair("adalora", "llama")
    r.eval()
    with pytest.raises(TypeError, match="adapter_names"):
        out(r, x_for("llama"), adapter_names=["default", "__base__", "default"])


@peft_fast_only
@pytest.mark.parametrize("kind", ["llama", "conv"])
def test_mixed_batch_rows_get_their_own_adapter(kind):
    _, r, i = pair("adalora", kind)
    add_both("adalora", r, i, "b", kind, seed=1, inference_mode=True, init_r=2)
    x = x_for(kind, batch=3)
    key = next(iter(x))
    i.eval()
    with torch.no_grad():
        mixed = out(i, x, adapter_names=["b", "default", "__base__"])
        for row, name in enumerate(["b", "default"]):
            i.set_adapter(name)
            assert_close(mixed[row:row + 1], out(i, {key: x[key][row:row + 1]}))
        with i.disable_adapter():
            assert_close(mixed[2:], out(i, {key: x[key][2:]}))


def test_ranknum_stays_frozen_in_16bit_models():
    """A deliberate difference: PEFT 0.21.2 re-wraps `ranknum` when it moves the adapter to a 16-bit base's dtype,
    which turns its requires_grad=False into True, so that an optimizer trains the rank count the delta is
    divided by. peft_fast keeps it frozen; the outputs and the other gradients are PEFT's."""
    base = base_model("llama").to(torch.bfloat16)
    _, r, i = build("adalora", "llama", base=base)
    flags = [{n: p.requires_grad for n, p in m.named_parameters() if ".ranknum." in n} for m in (r, i)]
    assert all(flags[0].values()) and flags[0].keys() == flags[1].keys()
    if impl is not ref:
        assert not any(flags[1].values())
        _same_params(r, i)
    assert_train_step_matches("llama", r, i, x_for("llama"), skip=(".ranknum.",))
    assert_eval_matches("llama", r, i, x_for("llama"))


@peft_fast_only
def test_refused_up_front_where_peft_fails_later():
    """A grouped Conv2d (PEFT fails in forward, its delta the wrong size for the weight)."""
    with pytest.raises(ValueError, match="groups=2"):
        impl.get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)),
                            AdaLoraConfig(**cfg("adalora", "mlp", target_modules=["0"])))
    model = copy.deepcopy(base_model("mlp"))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not supported"):
        impl.get_peft_model(model, AdaLoraConfig(**cfg("adalora", "mlp", target_modules=["lin0", "norm"])))
    assert_unchanged(model, snap)
