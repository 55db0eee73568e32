"""Initialisations by name, against PEFT: adapters trained with one of PEFT's initialisations that peft_fast cannot
run (EVA, CorDA, LoftQ, ...) load, as their weights come from the file; creating one is refused; the names PEFT
compares lowercased ("Gaussian", "OLoRA") work as in PEFT; "orthogonal" draws PEFT's factors."""
import copy
import json
import warnings

import pytest
import torch

from tiny_models import assert_close, base_model, impl, inputs, make_pair, out, peft_fast_only

# PEFT runs LoftQ's and CorDA's initialisation when loading too (scipy; CorDA's preprocessing on data), so it
# cannot load those files without them; peft_fast takes the weights from the file.
PEFT_ONLY = ["eva", "lora_ga", "mica", pytest.param("loftq", marks=peft_fast_only),
             pytest.param("corda", marks=peft_fast_only)]


@pytest.mark.parametrize("init", PEFT_ONLY)
def test_adapter_trained_with_a_peft_only_init_loads(init, tmp_path):
    _, ref_model, _ = make_pair("llama")
    with torch.no_grad():
        for n, p in ref_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    ref_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["init_lora_weights"] = init  # as PEFT writes it for an adapter created with that initialisation
    path.write_text(json.dumps(data))
    x = inputs("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = impl.PeftModel.from_pretrained(base_model("llama"), str(tmp_path))
    with torch.no_grad():
        assert_close(out(loaded, x), out(ref_model.eval(), x))
    assert loaded.peft_config["default"].init_lora_weights == init


@peft_fast_only
@pytest.mark.parametrize("init", ["eva", "corda", "loftq"])
def test_creating_a_peft_only_init_is_refused_and_changes_nothing(init):
    model = base_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=init):
        impl.get_peft_model(model, impl.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("init", ["Gaussian", "OLoRA"])
def test_init_names_are_compared_lowercased_as_in_peft(init):
    _, ref_model, impl_model = make_pair("llama", copy=False, init_lora_weights=init)
    ref_params = dict(ref_model.named_parameters())
    for n, p in impl_model.named_parameters():  # same RNG draws, same base rewrites (OLoRA)
        assert_close(p, ref_params[n], msg=n)
    x = inputs("llama")
    with torch.no_grad():
        assert_close(out(impl_model, x), out(ref_model, x))
    assert impl_model.peft_config["default"].init_lora_weights == init


@pytest.mark.parametrize("kind,dora", [("llama", False), ("gpt2", False), ("llama", True)])
def test_orthogonal_init_as_in_peft(kind, dora):
    """PEFT's draws in PEFT's order (one seed, the same factors), B·A = 0 at the start, and the same outputs."""
    base, ref_model, impl_model = make_pair(kind, copy=False, init_lora_weights="orthogonal", use_dora=dora)
    ref_params = dict(ref_model.named_parameters())
    for n, p in impl_model.named_parameters():
        assert_close(p, ref_params[n], msg=n)
        if n.endswith("lora_A.default.weight"):
            assert p.abs().sum() > 0
    x = inputs(kind)
    with torch.no_grad():
        assert_close(out(impl_model.eval(), x), out(ref_model.eval(), x))
        assert_close(out(impl_model, x), out(base.eval(), x))  # B·A = 0


def test_orthogonal_init_needs_an_even_rank_as_in_peft():
    from tiny_models import ref

    for lib in (ref, impl):
        with pytest.raises(ValueError, match="requires the LoRA rank to be even, got 3"):
            lib.get_peft_model(base_model("llama"), lib.LoraConfig(r=3, target_modules=["q_proj"],
                                                                   init_lora_weights="orthogonal"))


def test_orthogonal_init_on_a_targeted_2d_parameter_as_in_peft():
    """target_parameters on a Linear's weight: PEFT's orthogonal draws, the same factors under one seed."""
    from tiny_models import TinyMLP, ref

    torch.manual_seed(0)
    base = TinyMLP()
    made = []
    for lib in (ref, impl):
        torch.manual_seed(3)
        m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, target_parameters=["lin0.weight"],
                                                                   init_lora_weights="orthogonal"))
        made.append({n: p for n, p in m.named_parameters() if "lora_" in n})
    assert set(made[0]) == set(made[1]) and made[0]
    for n in made[0]:
        assert torch.equal(made[1][n], made[0][n]), n
