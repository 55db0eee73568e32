"""LoHa against PEFT 0.21.2 on linear models: parameters and init, forward and gradients (with rank and module
dropout), files both ways, merging, several adapters, refusals. Convolutions: test_parity_lycoris_conv.py."""
import copy
import warnings

import pytest
import torch
from lycoris_pairs import LoHaConfig, add_both, assert_eval_matches, assert_same_files, assert_train_step_matches, \
    build, cfg, pair, perturb, x_for
from tiny_models import AGAINST_PEFT, assert_close, assert_same_params, assert_same_state, assert_unchanged, \
    base_model, impl, out, peft_fast_only, raises_like_peft, ref, set_active, snapshot

CASES = [
    ("llama", {}),
    ("llama", {"init_weights": True}),
    ("llama", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": None}),  # PEFT's default targets for llama
    ("llama", {"target_modules": r".*\.(q_proj|v_proj)", "r": 2, "alpha": 3.5}),
    ("llama", {"rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, "alpha_pattern": {"v_proj": 16}}),
    ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["o_proj", "up_proj"]}),
    ("llama", {"modules_to_save": ["lm_head"]}),
    ("mlp", {}),
    ("mlp", {"rank_dropout": 0.3, "module_dropout": 0.4}),
]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'default'}" for k, kw in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameters_and_init_match_peft(case):
    """Same trainable names, shapes and count, and, under one seed, the same initial values (PEFT's init is
    deterministic: kaiming draws in a fixed order, w2_b zero with init_weights=True)."""
    kind, kw = case
    _, r, i = build("loha", kind, **kw)
    assert_same_params(r, i)
    assert i.get_nb_trainable_parameters() == r.get_nb_trainable_parameters()
    assert_same_state(r, i, atol=0, rtol=0)
    assert sorted(i.peft_config["default"].target_modules) == sorted(r.peft_config["default"].target_modules)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_gradients_match_peft(case):
    kind, kw = case
    _, r, i = pair("loha", kind, **kw)
    perturb(r)  # init_weights=True starts w2_b at zero: move it, so the adapters matter
    i.load_state_dict(r.state_dict())
    x = x_for(kind)
    assert_train_step_matches(kind, r, i, x, steps=2)
    assert_eval_matches(kind, r, i, x)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_rank_and_module_dropout_draw_peft_masks(kind):
    """Seeded training steps give PEFT's outputs and gradients exactly when the same random numbers are drawn in
    the same order: per adapter one draw for module dropout, then one per output row for rank dropout. Two active
    adapters, so an order that differs between adapters would show."""
    _, r, i = pair("loha", kind, rank_dropout=0.5, module_dropout=0.5)
    add_both("loha", r, i, "other", kind, seed=1, rank_dropout=0.25, module_dropout=0.3)
    set_active(r, ["default", "other"])
    set_active(i, ["default", "other"])
    assert_train_step_matches(kind, r, i, x_for(kind), steps=4)
    # the masks matter: two steps under different seeds differ (rank dropout rescales, module dropout skips)
    i.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = out(i, x_for(kind))
        torch.manual_seed(1)
        assert not torch.allclose(a, out(i, x_for(kind)))


def test_bf16_base_matches_peft():
    """A bf16 base: PEFT's dtypes (factors float32 after the autocast, or bf16 without it) and its outputs to bf16
    rounding (peft_fast applies ΔW in bf16 where PEFT casts x up to float32)."""
    base = base_model("llama").to(torch.bfloat16)
    for autocast in (True, False):
        kw = cfg("llama")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            r = ref.get_peft_model(copy.deepcopy(base), ref.LoHaConfig(**kw), autocast_adapter_dtype=autocast)
            torch.manual_seed(0)
            i = impl.get_peft_model(copy.deepcopy(base), LoHaConfig(**kw), autocast_adapter_dtype=autocast)
        assert {n: p.dtype for n, p in i.named_parameters()} == {n: p.dtype for n, p in r.named_parameters()}
        assert_same_state(r, i, atol=0, rtol=0)  # init in float32, rounded through bf16 as PEFT does
        x = x_for("llama")
        for model in (r, i):
            model.eval()
        with torch.no_grad():
            assert_close(out(i, x).float(), out(r, x).float(), atol=3e-2, rtol=3e-2)


def test_files_both_ways(tmp_path):
    _, r, i = pair("loha", "llama", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0},
                   modules_to_save=["lm_head"])
    add_both("loha", r, i, "second", "llama", seed=2, target_modules=["k_proj"], rank_dropout=0.1)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert_same_files(tmp_path / "impl", tmp_path / "ref")
    assert_same_files(tmp_path / "impl" / "second", tmp_path / "ref" / "second")
    x = x_for("llama")
    r.eval()
    with torch.no_grad():
        want = out(r, x)
    for src in ("ref", "impl"):  # PEFT's files into the implementation, and the implementation's into PEFT
        for lib in (impl, ref):
            loaded = lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / src))
            loaded.load_adapter(str(tmp_path / src / "second"), adapter_name="second")
            assert not loaded.training
            with torch.no_grad():
                assert_close(out(loaded, x), want)
                loaded.set_adapter("second")
                r.set_adapter("second")
                assert_close(out(loaded, x), out(r, x))
                r.set_adapter("default")
    assert type(loaded.peft_config["default"]).__name__ == "LoHaConfig"


def test_merge_unmerge_and_unload():
    _, r, i = pair("loha", "llama")
    add_both("loha", r, i, "other", "llama", seed=1, target_modules=["q_proj", "o_proj"])
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        want = out(r, x)
        for m in (r, i):
            m.merge_adapter()
        assert_same_state(r, i)  # the merged base weights are PEFT's
        assert_close(out(i, x), want)
        assert i.base_model.model.model.layers[0].self_attn.q_proj.merged
        for m in (r, i):
            m.unmerge_adapter()
        assert_same_state(r, i)
        assert_close(out(i, x), want)
        for m in (r, i):
            m.merge_adapter(adapter_names=["default", "other"], safe_merge=True)
        assert_same_state(r, i)
        for m in (r, i):
            m.unmerge_adapter()
        merged_r = r.merge_and_unload(adapter_names=["other"], safe_merge=True)
        merged_i = i.merge_and_unload(adapter_names=["other"], safe_merge=True)
        assert type(merged_i.model.layers[0].self_attn.o_proj) is torch.nn.Linear
        assert_same_state(merged_r, merged_i)
        assert_close(merged_i(**x).logits, merged_r(**x).logits)
    _, r, i = pair("loha", "mlp")
    plain = i.unload()
    assert type(plain.lin0) is torch.nn.Linear
    torch.testing.assert_close(plain.lin0.weight, base_model("mlp").lin0.weight, atol=0, rtol=0)


def test_several_adapters_set_disable_delete():
    _, r, i = pair("loha", "llama")
    add_both("loha", r, i, "b", "llama", seed=1, target_modules=["q_proj", "up_proj"], r=2, alpha=5)
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        for active in ("b", ["default", "b"], "default"):
            set_active(r, active)
            set_active(i, active)
            assert_close(out(i, x), out(r, x), msg=str(active))
            assert i.active_adapters == r.active_adapters
        with i.disable_adapter(), r.disable_adapter():
            assert_close(out(i, x), out(r, x))
            assert_close(out(i, x), base_model("llama")(**x).logits)
        for m in (r, i):
            m.set_adapter("b")
            m.delete_adapter("default")
        assert i.active_adapters == r.active_adapters == ["b"]
        assert set(i.peft_config) == set(r.peft_config) == {"b"}
        assert_same_state(r, i)
        assert_close(out(i, x), out(r, x))
    assert [s.module_type for s in i.get_layer_status()] == [s.module_type for s in r.get_layer_status()]
    assert i.get_model_status().adapter_model_type == r.get_model_status().adapter_model_type == "LoHaModel"


def test_gpt2_conv1d_is_refused_like_peft():
    """transformers' Conv1D (GPT-2) is not among PEFT's LoHa layer types: both refuse it."""
    kw = {"target_modules": ["c_attn"], "init_weights": False}
    base = base_model("gpt2")
    raises_like_peft(TypeError, ["not supported", "Conv2d, Conv1d, Linear"],
                     lambda: impl.get_peft_model(base, LoHaConfig(**kw)),
                     lambda: ref.get_peft_model(base_model("gpt2"), ref.LoHaConfig(**kw)))
    raises_like_peft(TypeError, ["not supported"],
                     lambda: impl.get_peft_model(base, LoHaConfig(target_modules="all-linear")),
                     lambda: ref.get_peft_model(base_model("gpt2"), ref.LoHaConfig(target_modules="all-linear")))


def test_refusals_like_peft():
    _, r, i = pair("loha", "mlp")
    raises_like_peft(ValueError, ["positive integer"],
                     lambda: i.add_adapter("bad", LoHaConfig(r=0, target_modules=["lin0"])),
                     lambda: r.add_adapter("bad", ref.LoHaConfig(r=0, target_modules=["lin0"])))
    raises_like_peft(ValueError, ["LOHA", "LORA"],
                     lambda: i.add_adapter("lora", impl.LoraConfig(target_modules=["lin2"])),
                     lambda: r.add_adapter("lora", ref.LoraConfig(target_modules=["lin2"])))


@peft_fast_only
def test_refused_changes_leave_the_model_as_it_was(tmp_path):
    """A refused add (a bad rank in rank_pattern, found at the second layer) or load (a file whose shapes do not
    fit the adapter it would overwrite) changes nothing. PEFT leaves the first layer's new adapter behind."""
    _, _, i = pair("loha", "mlp")
    snap = snapshot(i)
    with pytest.raises(ValueError, match="positive integer"):
        i.add_adapter("bad", LoHaConfig(target_modules=["lin0", "lin1"], rank_pattern={"lin1": 0}))
    assert_unchanged(i, snap)
    _, _, other = pair("loha", "mlp", r=2)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not fit"):
        i.load_adapter(str(tmp_path), adapter_name="default")  # r=2 factors into the r=4 adapter
    assert_unchanged(i, snap)


@peft_fast_only
def test_mixed_batches_serve_each_sample_its_adapter():
    """A deliberate difference: PEFT 0.21.2 drops `adapter_names` for LoHa (every sample gets the active adapter);
    peft_fast runs each sample through the adapter it names, as LoRA's mixed batches do."""
    _, r, i = pair("loha", "llama")
    add_both("loha", r, i, "b", "llama", seed=1, target_modules=["q_proj", "up_proj"])
    x = x_for("llama", batch=3)
    names = ["b", "__base__", "default"]
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        mixed = out(i, x, adapter_names=names)
        for row, name in enumerate(names):
            one = {"input_ids": x["input_ids"][row:row + 1]}
            if name == "__base__":
                with r.disable_adapter():
                    want = out(r, one)
            else:
                r.set_adapter(name)
                want = out(r, one)
            assert_close(mixed[row:row + 1], want, msg=name)
        r.set_adapter("default")
        assert_close(out(r, x, adapter_names=names), out(r, x))  # PEFT: the names are ignored
    with pytest.raises(ValueError, match="training mode"):
        i.train()(**x, adapter_names=names)


@peft_fast_only
def test_4bit_bases_are_refused():
    """PEFT 0.21.2 builds LoHa on a bitsandbytes 4-bit layer from the packed weight's shape and then fails in
    forward; peft_fast refuses 4-bit bases (its own NF4Linear too) before changing anything."""
    model = impl.quantize(base_model("llama"))
    snap = snapshot(model)
    with pytest.raises(TypeError, match="4-bit"):
        impl.get_peft_model(model, LoHaConfig(target_modules=["q_proj"]))
    assert_unchanged(model, snap)


def test_config_round_trip_and_checks():
    config = LoHaConfig(target_modules=["q_proj"], r=4, alpha=2.5, rank_dropout=0.1, use_effective_conv2d=True)
    peft_dict = ref.LoHaConfig(target_modules=["q_proj"], r=4, alpha=2.5, rank_dropout=0.1,
                               use_effective_conv2d=True).to_dict()
    mine = config.to_dict()
    assert {k: v for k, v in mine.items() if k != "peft_type"} == \
        {k: v for k, v in peft_dict.items() if k in mine and k != "peft_type"}
    assert str(getattr(mine["peft_type"], "value", mine["peft_type"])) == "LOHA"
    if not AGAINST_PEFT:  # PEFT takes any probability and fails later (NaN from an empty rank-dropout mask)
        with pytest.raises(ValueError, match="rank_dropout"):
            LoHaConfig(rank_dropout=1.5)
        assert type(impl.PeftConfig.from_peft(ref.LoHaConfig(r=3))) is LoHaConfig
