"""LoHa against PEFT 0.21.2 on linear models: parameters and init, forward and gradients (with rank and module
dropout), files both ways, merging, several adapters, refusals. Convolutions: test_parity_lycoris_conv.py."""
import pytest
import torch
from lycoris_checks import check_bf16_base, check_files_both_ways, check_merge_cycle, check_mixed_batch, \
    check_refused_changes, check_several_adapters
from lycoris_pairs import LoHaConfig, add_both, assert_eval_matches, assert_train_step_matches, build, pair, \
    perturb, x_for
from tiny_models import AGAINST_PEFT, assert_same_params, assert_same_state, base_model, impl, out, \
    peft_fast_only, raises_like_peft, ref, set_active

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
    check_bf16_base("loha")


def test_files_both_ways(tmp_path):
    first = {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3.0}, "modules_to_save": ["lm_head"]}
    check_files_both_ways("loha", tmp_path, first, {"target_modules": ["k_proj"], "rank_dropout": 0.1})


def test_merge_unmerge_and_unload():
    check_merge_cycle("loha", {}, {"target_modules": ["q_proj", "o_proj"]})


def test_several_adapters_set_disable_delete():
    check_several_adapters("loha", {"target_modules": ["q_proj", "up_proj"], "r": 2, "alpha": 5}, "LoHaModel")


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
    """Also 4-bit bases: PEFT 0.21.2 builds LoHa on a bitsandbytes 4-bit layer from the packed weight's shape and
    then fails in forward; peft_fast refuses them (its own NF4Linear too) before changing anything."""
    check_refused_changes("loha", tmp_path)


@peft_fast_only
def test_mixed_batches_serve_each_sample_its_adapter():
    """A deliberate difference: PEFT 0.21.2 drops `adapter_names` for LoHa (every sample gets the active adapter);
    peft_fast runs each sample through the adapter it names, as LoRA's mixed batches do."""
    check_mixed_batch("loha", {"target_modules": ["q_proj", "up_proj"]})


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
