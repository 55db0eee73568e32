"""LoKr against PEFT 0.21.2 on linear models: factor layouts (full or low-rank w1/w2, decompose_both,
decompose_factor), the three inits, forward and gradients (with rank and module dropout, rank_dropout_scale),
files both ways, merging, several adapters, refusals. Convolutions: test_parity_lycoris_conv.py."""
import pytest
import torch
from lycoris_checks import check_bf16_base, check_files_both_ways, check_merge_cycle, check_mixed_batch, \
    check_refused_changes, check_several_adapters
from lycoris_pairs import LoKrConfig, add_both, assert_eval_matches, assert_train_step_matches, build, pair, \
    perturb, x_for
from tiny_models import AGAINST_PEFT, assert_same_params, assert_same_state, base_model, impl, out, \
    peft_fast_only, raises_like_peft, ref, set_active

# llama: 64 = 8·8 and 128 = 8·16 (decompose_factor=4: 4·16, 4·32); r=4 keeps w2 whole (r >= max side / 2), r=2
# splits it into w2_a·w2_b, and decompose_both splits w1 too.
CASES = [
    ("llama", {}),
    ("llama", {"r": 2}),
    ("llama", {"r": 2, "decompose_both": True}),
    ("llama", {"r": 1, "decompose_both": True, "decompose_factor": 4}),
    ("llama", {"decompose_factor": 16, "r": 16}),
    ("llama", {"init_weights": True, "r": 2, "decompose_both": True}),
    ("llama", {"init_weights": "lycoris", "r": 2}),
    ("llama", {"init_weights": "lycoris"}),
    ("llama", {"target_modules": "all-linear", "r": 3, "alpha": 2.5}),
    ("llama", {"target_modules": None}),  # PEFT's default targets for llama
    ("llama", {"rank_pattern": {"q_proj": 1, r"layers\.1\.mlp\.down_proj": 8}, "alpha_pattern": {"v_proj": 16}}),
    ("llama", {"layers_to_transform": 0, "modules_to_save": ["lm_head"]}),
    ("mlp", {}),
    ("mlp", {"decompose_factor": 2, "decompose_both": True, "r": 1}),
    ("mlp", {"rank_dropout": 0.3, "module_dropout": 0.4, "rank_dropout_scale": True}),
]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'default'}" for k, kw in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameters_and_init_match_peft(case):
    """Same trainable names, shapes and count, and, under one seed, the same initial values (PEFT's three init
    recipes are deterministic: kaiming draws in a fixed order, one side zeroed)."""
    kind, kw = case
    _, r, i = build("lokr", kind, **kw)
    assert_same_params(r, i)
    assert i.get_nb_trainable_parameters() == r.get_nb_trainable_parameters()
    assert_same_state(r, i, atol=0, rtol=0)
    assert sorted(i.peft_config["default"].target_modules) == sorted(r.peft_config["default"].target_modules)


def test_the_cases_cover_every_factor_layout():
    names = {n.split(".")[-2] for kind, kw in CASES for n, _ in build("lokr", kind, **kw)[2].named_parameters()
             if "lokr_" in n}
    assert names == {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}  # lokr_t2: conv


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_gradients_match_peft(case):
    kind, kw = case
    _, r, i = pair("lokr", kind, **kw)
    perturb(r)  # the inits start w1 or w2 at zero: move them, so the adapters matter
    i.load_state_dict(r.state_dict())
    x = x_for(kind)
    assert_train_step_matches(kind, r, i, x, steps=2)
    assert_eval_matches(kind, r, i, x)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
@pytest.mark.parametrize("scale", [False, True])
def test_rank_and_module_dropout_draw_peft_masks(kind, scale):
    """Seeded training steps give PEFT's outputs and gradients exactly when the same random numbers are drawn in
    the same order: per adapter one draw for module dropout, then one per output row for rank dropout (the kept
    rows rescaled with rank_dropout_scale). Two active adapters, so an order that differs between them would show."""
    _, r, i = pair("lokr", kind, r=2, rank_dropout=0.5, module_dropout=0.5, rank_dropout_scale=scale)
    add_both("lokr", r, i, "other", kind, seed=1, rank_dropout=0.25, module_dropout=0.3, rank_dropout_scale=not scale)
    set_active(r, ["default", "other"])
    set_active(i, ["default", "other"])
    assert_train_step_matches(kind, r, i, x_for(kind), steps=4)
    i.train()
    with torch.no_grad():  # the masks matter: two steps under different seeds differ
        torch.manual_seed(0)
        a = out(i, x_for(kind))
        torch.manual_seed(1)
        assert not torch.allclose(a, out(i, x_for(kind)))


def test_bf16_base_matches_peft():
    check_bf16_base("lokr", r=2, decompose_both=True)


def test_files_both_ways(tmp_path):
    first = {"r": 2, "decompose_both": True, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"v_proj": 3.0},
             "modules_to_save": ["lm_head"]}
    second = {"target_modules": ["k_proj"], "decompose_factor": 4, "rank_dropout_scale": True,
              "init_weights": "lycoris"}
    check_files_both_ways("lokr", tmp_path, first, second)


def test_merge_unmerge_and_unload():
    check_merge_cycle("lokr", {"r": 2}, {"target_modules": ["q_proj", "o_proj"], "decompose_both": True, "r": 1})


def test_several_adapters_set_disable_delete():
    check_several_adapters("lokr", {"target_modules": ["q_proj", "up_proj"], "r": 2, "alpha": 5}, "LoKrModel")


def test_gpt2_conv1d_is_refused_like_peft():
    """transformers' Conv1D (GPT-2) is not among PEFT's LoKr layer types: both refuse it."""
    kw = {"target_modules": ["c_fc"], "init_weights": False}
    raises_like_peft(TypeError, ["not supported", "Conv2d, Conv1d, Linear"],
                     lambda: impl.get_peft_model(base_model("gpt2"), LoKrConfig(**kw)),
                     lambda: ref.get_peft_model(base_model("gpt2"), ref.LoKrConfig(**kw)))


def test_refusals_like_peft():
    _, r, i = pair("lokr", "mlp")
    raises_like_peft(ValueError, ["positive integer"],
                     lambda: i.add_adapter("bad", LoKrConfig(r=-1, target_modules=["lin0"])),
                     lambda: r.add_adapter("bad", ref.LoKrConfig(r=-1, target_modules=["lin0"])))
    raises_like_peft(ValueError, ["LOKR", "LORA"],
                     lambda: i.add_adapter("lora", impl.LoraConfig(target_modules=["lin2"])),
                     lambda: r.add_adapter("lora", ref.LoraConfig(target_modules=["lin2"])))


@peft_fast_only
def test_refused_changes_leave_the_model_as_it_was(tmp_path):
    """Also 4-bit bases: PEFT 0.21.2 builds LoKr on a bitsandbytes 4-bit layer (factored from the packed weight's
    size) and then fails in forward; peft_fast refuses them (its own NF4Linear too) before changing anything."""
    check_refused_changes("lokr", tmp_path)


@peft_fast_only
def test_mixed_batches_serve_each_sample_its_adapter():
    """A deliberate difference: PEFT 0.21.2 drops `adapter_names` for LoKr (every sample gets the active adapter);
    peft_fast runs each sample through the adapter it names, as LoRA's mixed batches do."""
    check_mixed_batch("lokr", {"target_modules": ["q_proj", "up_proj"], "r": 2, "decompose_both": True})


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    mine = peft_factorization if AGAINST_PEFT else __import__("peft_fast.tuners.lokr", fromlist=["x"]).factorization
    for dim in (1, 2, 7, 12, 64, 96, 127, 128, 360, 1000, 4096, 11008, 14336):
        for factor in (-1, 0, 1, 2, 3, 4, 8, 16, 100):
            assert mine(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_config_round_trip_and_checks():
    kw = {"target_modules": ["q_proj"], "r": 4, "alpha": 2.5, "decompose_both": True, "decompose_factor": 8,
          "rank_dropout_scale": True, "init_weights": "lycoris"}
    mine, peft_dict = LoKrConfig(**kw).to_dict(), ref.LoKrConfig(**kw).to_dict()
    assert {k: v for k, v in mine.items() if k != "peft_type"} == \
        {k: v for k, v in peft_dict.items() if k in mine and k != "peft_type"}
    assert str(getattr(mine["peft_type"], "value", mine["peft_type"])) == "LOKR"
    if not AGAINST_PEFT:  # PEFT checks no types, takes any string as init_weights=True, and any probability
        with pytest.raises(ValueError, match="lycoris"):
            LoKrConfig(init_weights="gaussian")
        with pytest.raises(ValueError, match="module_dropout"):
            LoKrConfig(module_dropout=-0.1)
        with pytest.raises(TypeError, match="decompose_factor"):
            LoKrConfig(decompose_factor="4")
        assert type(impl.PeftConfig.from_peft(ref.LoKrConfig(r=3))) is LoKrConfig
