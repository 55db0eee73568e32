"""Regression tests for adapter lifecycle parity with PEFT: which adapter becomes active after delete_adapter,
requires_grad after add / load / set / delete, base parameters named like adapter parameters, modules_to_save
suffix matching, bias="all" files, encoder-decoder mixed-adapter beam search and load_adapter's return value.

Every test compares against PEFT step by step and also passes with PEFT_FAST_TESTS_AGAINST_PEFT=1."""
import copy
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tiny_models import (
    add_both,
    assert_close,
    assert_same_params,
    base_model,
    copy_weights,
    impl,
    inputs,
    make_pair,
    name_diff,
    out,
    ref,
    set_active,
)


def _rg(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_same_rg(r, i, step=""):
    rr, ii = _rg(r), _rg(i)
    assert set(rr) == set(ii), f"{step}: {name_diff(rr, ii)}"
    diff = {n: (rr[n], ii[n]) for n in rr if rr[n] != ii[n]}
    assert not diff, f"{step}: requires_grad differs (PEFT, impl): {diff}"


def _eval_out(model, kind):
    model.eval()
    with torch.no_grad():
        return out(model, inputs(kind))


def _perturb(model, predicate, seed=3, scale=0.5):
    """Add seeded noise to every parameter whose name satisfies predicate (so that it matters in outputs/files)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if predicate(n):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def _layer_actives(model):
    """{layer name: active adapters} for every adapted (LoRA) layer."""
    return {
        n: list(m.active_adapters)
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "active_adapters")
    }


def _load_quietly(lib, kind, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(base_model(kind), str(path), **kw)


def _safetensors_keys(d):
    keys = {}
    for root, _, names in os.walk(d):
        for fn in names:
            if fn.endswith(".safetensors"):
                keys[os.path.relpath(os.path.join(root, fn), d)] = set(load_file(os.path.join(root, fn)))
    return keys


# ------------------------------------------------------------------------------ (1) delete_adapter: new active
# Each scenario: adapters added in order as (name, target_modules); then optionally activated; then one deleted.
# PEFT's rules: per layer, the remaining active adapters if any, else the alphabetically first adapter the layer
# still holds; at model level, the active adapters of the first adapted layer.
DELETE_SCENARIOS = {
    # the reviewer's case: lin1 never held "default" yet had it as active adapter; it falls back to "a"
    "per_layer_fallback": ([("default", ["lin0"]), ("a", ["lin1"]), ("z", ["lin0"])], None, "default"),
    # insertion order (z before a) differs from alphabetical order in each layer
    "alphabetical_not_insertion": (
        [("default", ["lin0", "lin1"]), ("z", ["lin0", "lin1"]), ("a", ["lin1"])],
        None,
        "default",
    ),
    # several active adapters: the others stay active
    "multi_active": (
        [("default", ["lin0", "lin1"]), ("z", ["lin0"]), ("a", ["lin0", "lin1"])],
        ["default", "z"],
        "default",
    ),
    # deleting a non-active adapter leaves the active one
    "inactive": ([("default", ["lin0"]), ("b", ["lin1"]), ("a", ["lin0", "lin1"])], "b", "a"),
}


@pytest.mark.parametrize("scenario", list(DELETE_SCENARIOS))
def test_delete_adapter_picks_peft_new_active_adapter(scenario):
    adapters, activate, victim = DELETE_SCENARIOS[scenario]
    (first, first_targets), *rest = adapters
    _, r, i = make_pair("mlp", adapter_name=first, target_modules=first_targets)
    for k, (name, targets) in enumerate(rest):
        add_both(r, i, name, "mlp", seed=10 + k, target_modules=targets)
    if activate is not None:
        set_active(r, activate)
        set_active(i, activate)
    assert _layer_actives(i) == _layer_actives(r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.delete_adapter(victim)
        i.delete_adapter(victim)
    assert list(i.peft_config) == list(r.peft_config)
    assert _layer_actives(i) == _layer_actives(r)
    assert i.active_adapter == r.active_adapter
    assert list(i.active_adapters) == list(r.active_adapters)
    assert not any(f".{victim}." in n for n, _ in i.named_parameters())
    _assert_same_rg(r, i, "after delete")
    assert_close(_eval_out(i, "mlp"), _eval_out(r, "mlp"))


def test_delete_adapter_llama_per_layer_choice():
    """Same rule on a transformers model whose adapters cover different projections."""
    _, r, i = make_pair("llama", target_modules=["q_proj"])
    add_both(r, i, "zz", "llama", seed=1, target_modules=["v_proj", "q_proj"])
    add_both(r, i, "aa", "llama", seed=2, r=2, target_modules=["v_proj"])
    r.delete_adapter("default")
    i.delete_adapter("default")
    assert _layer_actives(i) == _layer_actives(r)
    assert i.active_adapter == r.active_adapter
    assert list(i.active_adapters) == list(r.active_adapters)
    _assert_same_rg(r, i)
    assert_close(_eval_out(i, "llama"), _eval_out(r, "llama"))


def test_save_with_no_adapter_active_after_a_delete(tmp_path):
    """Deleting `default` where it alone adapts the first layer leaves no adapter active (PEFT's per-layer rule), a
    state peft_fast runs (the base model's outputs, with a warning). Saving it writes the remaining adapter whole;
    PEFT fails there (KeyError 'default') without writing anything."""
    i = impl.get_peft_model(base_model("mlp"), impl.LoraConfig(r=2, target_modules=["lin0"]))
    i.add_adapter("b", impl.LoraConfig(r=2, target_modules=["lin1"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        i.delete_adapter("default")
    if i.active_adapters:
        pytest.skip("this library keeps an adapter active")
    i.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_config.json").exists() and (tmp_path / "README.md").exists()
    loaded = impl.PeftModel.from_pretrained(base_model("mlp"), str(tmp_path / "b"), adapter_name="b")
    want = {n: p for n, p in i.state_dict().items() if "lora_" in n}
    got = loaded.state_dict()
    assert want and all(torch.equal(got[n], p) for n, p in want.items())


# ------------------------------------------------------------------------------ (2) requires_grad parity
def test_add_adapter_on_model_loaded_in_inference_mode(tmp_path):
    _, src, _ = make_pair("mlp", modules_to_save=["lin2"])
    src.save_pretrained(tmp_path)
    r = _load_quietly(ref, "mlp", tmp_path)
    i = _load_quietly(impl, "mlp", tmp_path)
    _assert_same_rg(r, i, "loaded (inference mode)")
    add_both(r, i, "two", "mlp", seed=1, r=2, target_modules=["lin1"])
    _assert_same_rg(r, i, "after add_adapter")
    set_active(r, "two")
    set_active(i, "two")
    _assert_same_rg(r, i, "after set_adapter")
    assert_close(_eval_out(i, "mlp"), _eval_out(r, "mlp"))


def test_load_adapter_second_adapter_with_modules_to_save(tmp_path):
    kw2 = dict(r=2, lora_alpha=4, target_modules=["lin1"])
    _, r, i = make_pair("mlp", modules_to_save=["lin2"])
    add_both(r, i, "two", "mlp", seed=1, modules_to_save=["lin2"], **kw2)
    _perturb(r, lambda n: "modules_to_save" in n)
    copy_weights(r, i)
    r.save_pretrained(tmp_path)
    expected = {}
    for name in ("default", "two"):
        set_active(r, name)
        expected[name] = _eval_out(r, "mlp")

    lr = _load_quietly(ref, "mlp", tmp_path)
    li = _load_quietly(impl, "mlp", tmp_path)
    for m in (lr, li):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.load_adapter(str(tmp_path / "two"), adapter_name="two")
    _assert_same_rg(lr, li, "after load_adapter")
    assert_close(_eval_out(li, "mlp"), _eval_out(lr, "mlp"))
    assert_close(_eval_out(li, "mlp"), expected["default"])
    set_active(lr, "two")
    set_active(li, "two")
    _assert_same_rg(lr, li, "after set_adapter('two')")
    assert_close(_eval_out(li, "mlp"), expected["two"])
    assert_close(_eval_out(li, "mlp"), _eval_out(lr, "mlp"))
    # load again onto the existing name, trainable this time
    for m in (lr, li):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.load_adapter(str(tmp_path / "two"), adapter_name="two", is_trainable=True)
    _assert_same_rg(lr, li, "after reloading 'two' with is_trainable=True")
    assert li.training == lr.training


def test_user_changed_requires_grad_then_add_adapter():
    _, r, i = make_pair("mlp", target_modules=["lin0"])
    for m in (r, i):
        m.get_base_model().norm.requires_grad_(True)
        m.get_base_model().lin0.lora_A["default"].requires_grad_(False)
    _assert_same_rg(r, i, "after the user's changes")
    add_both(r, i, "two", "mlp", seed=1, target_modules=["lin1"])
    _assert_same_rg(r, i, "after add_adapter")
    set_active(r, "two")
    set_active(i, "two")
    _assert_same_rg(r, i, "after set_adapter('two')")


def test_delete_inactive_adapter_after_set_adapter_inference_mode():
    _, r, i = make_pair("mlp", target_modules=["lin0"], modules_to_save=["lin2"])
    add_both(r, i, "n", "mlp", seed=1, target_modules=["lin0"])
    r.set_adapter("default", inference_mode=True)
    i.set_adapter("default", inference_mode=True)
    _assert_same_rg(r, i, "after set_adapter(inference_mode=True)")
    r.delete_adapter("n")
    i.delete_adapter("n")
    _assert_same_rg(r, i, "after deleting the non-active adapter")
    assert i.get_nb_trainable_parameters() == r.get_nb_trainable_parameters()


@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("biased_first", [True, False], ids=["biased_first", "biased_second"])
def test_bias_adapter_with_a_second_adapter(bias, biased_first, tmp_path):
    kw_bias = dict(target_modules=["lin0"], bias=bias, modules_to_save=["lin2"])
    kw_none = dict(target_modules=["lin1"])
    kw1, kw2 = (kw_bias, kw_none) if biased_first else (kw_none, kw_bias)
    _, r, i = make_pair("mlp", **kw1)
    _assert_same_rg(r, i, "initial")
    add_both(r, i, "two", "mlp", seed=1, **kw2)
    _assert_same_rg(r, i, "after add_adapter")
    set_active(r, "two")
    set_active(i, "two")
    _assert_same_rg(r, i, "after set_adapter('two')")
    with r.disable_adapter(), i.disable_adapter():
        _assert_same_rg(r, i, "inside disable_adapter")
    _assert_same_rg(r, i, "after disable_adapter")
    assert_close(_eval_out(i, "mlp"), _eval_out(r, "mlp"))
    r.delete_adapter("default")
    i.delete_adapter("default")
    _assert_same_rg(r, i, "after delete_adapter('default')")
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert _safetensors_keys(tmp_path / "impl") == _safetensors_keys(tmp_path / "ref")


def test_bias_all_with_modules_to_save_requires_grad():
    _, r, i = make_pair("mlp", target_modules=["lin0"], bias="all", modules_to_save=["lin2"])
    _assert_same_rg(r, i)
    assert i.get_nb_trainable_parameters() == r.get_nb_trainable_parameters()


def test_load_adapter_trainable_with_modules_to_save(tmp_path):
    _, src, _ = make_pair("mlp", target_modules=["lin0"], modules_to_save=["lin2"])
    src.save_pretrained(tmp_path)
    _, r, i = make_pair("mlp", target_modules=["lin1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.load_adapter(str(tmp_path), adapter_name="two", is_trainable=True)
        i.load_adapter(str(tmp_path), adapter_name="two", is_trainable=True)
    _assert_same_rg(r, i, "after load_adapter(is_trainable=True)")
    set_active(r, "two")
    set_active(i, "two")
    _assert_same_rg(r, i, "after set_adapter('two')")
    assert_close(_eval_out(i, "mlp"), _eval_out(r, "mlp"))


# ------------------------------------------------------------------------------ (3) base params named "lora_"
class _LoraNamedBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.flora_gate = nn.Linear(8, 8)  # "lora_" is a substring of this base module's parameter names

    def forward(self, x):
        return self.flora_gate(self.lin(x))


def test_base_parameter_named_like_lora_stays_frozen():
    torch.manual_seed(0)
    base = _LoraNamedBase()
    kw = dict(r=2, target_modules=["lin"])
    r = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**kw))
    i = impl.get_peft_model(copy.deepcopy(base), impl.LoraConfig(**kw))
    _assert_same_rg(r, i)
    trainable = sorted(n for n, v in _rg(i).items() if v)
    assert trainable == sorted(n for n, v in _rg(r).items() if v)
    assert not any("flora_gate" in n for n in trainable)
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    # and it stays frozen through a second adapter and set_adapter
    for m, lib in ((r, ref), (i, impl)):
        m.add_adapter("two", lib.LoraConfig(**kw))
        m.set_adapter("two")
    _assert_same_rg(r, i, "after add_adapter + set_adapter")


# ------------------------------------------------------------------------------ (4) modules_to_save suffixes
MTS_SUFFIXES = [["head"], ["norm"], ["model.norm"], ["mlp.down_proj"], ["layers.1.mlp"]]


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper")


@pytest.mark.parametrize("mts", MTS_SUFFIXES, ids=["-".join(m) for m in MTS_SUFFIXES])
def test_modules_to_save_plain_suffix_match(mts):
    _, r, i = make_pair("llama", target_modules=["q_proj"], modules_to_save=mts)
    wrapped = _wrapped(r)
    assert wrapped, "PEFT wraps something for this suffix"
    assert _wrapped(i) == wrapped
    _assert_same_rg(r, i)
    assert_same_params(r, i)
    _perturb(r, lambda n: "modules_to_save" in n)
    copy_weights(r, i)
    assert_close(_eval_out(i, "llama"), _eval_out(r, "llama"))


def test_modules_to_save_suffix_examples_wrap_like_peft():
    """'head' wraps 'lm_head' and 'norm' wraps every module whose name ends in 'norm' (all layernorms)."""
    _, r, i = make_pair("llama", target_modules=["q_proj"], modules_to_save=["head"])
    assert _wrapped(i) == _wrapped(r) and any(n.endswith("lm_head") for n in _wrapped(i))
    _, r, i = make_pair("llama", target_modules=["q_proj"], modules_to_save=["norm"])
    norms = sorted(f"base_model.model.{n}" for n, _ in base_model("llama").named_modules() if n.endswith("norm"))
    assert len(norms) > 1
    assert _wrapped(r) == norms
    assert _wrapped(i) == norms


@pytest.mark.parametrize("mts", [["norm"], ["head"]], ids=["norm", "head"])
def test_peft_file_with_suffix_modules_to_save_loads(mts, tmp_path):
    _, r, _ = make_pair("llama", target_modules=["q_proj"], modules_to_save=mts)
    _perturb(r, lambda n: "modules_to_save" in n)
    r.save_pretrained(tmp_path)
    expected = _eval_out(r, "llama")
    li = _load_quietly(impl, "llama", tmp_path)
    lr = _load_quietly(ref, "llama", tmp_path)
    assert _wrapped(li) == _wrapped(lr)
    _assert_same_rg(lr, li)
    assert_close(_eval_out(li, "llama"), expected)
    # the wrappers' weights actually matter here
    with li.disable_adapter():
        assert not torch.allclose(_eval_out(li, "llama"), expected, atol=1e-3)


# ------------------------------------------------------------------------------ (5) bias="all" + modules_to_save
def test_bias_all_with_modules_to_save_files_both_ways(tmp_path):
    kw = dict(target_modules=["lin0"], bias="all", modules_to_save=["lin2"])
    _, r, i = make_pair("mlp", **kw)
    # every trainable parameter (LoRA, base biases, modules_to_save copy) gets new values
    _perturb(r, lambda n: dict(r.named_parameters())[n].requires_grad)
    copy_weights(r, i)
    expected = _eval_out(r, "mlp")
    assert_close(_eval_out(i, "mlp"), expected)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    rk = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    ik = load_file(tmp_path / "impl" / "adapter_model.safetensors")
    assert set(ik) == set(rk), f"only PEFT: {sorted(set(rk) - set(ik))}  only impl: {sorted(set(ik) - set(rk))}"
    for k in rk:
        assert torch.equal(ik[k], rk[k]), k
    # each library loads the other's file (and its own) with the original outputs
    for lib, src in ((impl, "ref"), (ref, "impl"), (impl, "impl")):
        loaded = _load_quietly(lib, "mlp", tmp_path / src)
        assert_close(_eval_out(loaded, "mlp"), expected, msg=f"{lib.__name__} loading the {src} file")


# ------------------------------------------------------------------------------ (6) seq2seq beams + adapter_names
def _tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BartForConditionalGeneration(cfg).eval()


def test_seq2seq_generate_adapter_names_with_beams():
    base = _tiny_bart()
    # q_proj/v_proj exist in the encoder's self-attention, the decoder's self- and cross-attention
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
    models = {}
    for lib in (ref, impl):
        torch.manual_seed(0)
        m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**kw))
        torch.manual_seed(1)
        m.add_adapter("two", lib.LoraConfig(**kw))
        models[lib] = m
    r, i = models[ref], models[impl]
    _perturb(r, lambda n: "lora_" in n, scale=1.0)
    copy_weights(r, i)
    r.eval()
    i.eval()
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    gen_kw = dict(num_beams=2, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    names = ["default", "two", "__base__"]
    with torch.no_grad():
        gr = r.generate(input_ids=ids, adapter_names=names, **gen_kw)
        gi = i.generate(input_ids=ids, adapter_names=names, **gen_kw)
    assert torch.equal(gi.sequences, gr.sequences), f"{gi.sequences.tolist()} != PEFT {gr.sequences.tolist()}"
    assert_close(gi.sequences_scores, gr.sequences_scores, atol=1e-4, rtol=1e-4)
    # each row is what that adapter alone generates (so the mixed batch routed every row, encoder included)
    with torch.no_grad():
        for row, name in enumerate(names):
            if name == "__base__":
                with r.disable_adapter():
                    alone = r.generate(input_ids=ids[row : row + 1], **gen_kw)
            else:
                r.set_adapter(name)
                alone = r.generate(input_ids=ids[row : row + 1], **gen_kw)
            assert_close(gi.sequences_scores[row : row + 1], alone.sequences_scores, atol=1e-4, rtol=1e-4)
    # the adapters matter: the same input through different adapters scores differently
    same = ids[:1].expand(3, -1)
    with torch.no_grad():
        gs = i.generate(input_ids=same, adapter_names=names, **gen_kw)
    assert len({round(s, 4) for s in gs.sequences_scores.tolist()}) == 3


# ------------------------------------------------------------------------------ (7) load_adapter return value
LOAD_RESULT_CASES = {
    # (config of the saved adapter, target_modules of the adapter already in the receiving model)
    "plain": ({}, ["lin1"]),
    "modules_to_save": ({"target_modules": ["lin0"], "modules_to_save": ["lin2"]}, ["lin1"]),
    "bias_lora_only": ({"target_modules": ["lin0"], "bias": "lora_only"}, ["lin0", "lin1"]),
    "bias_all_same_targets": ({"target_modules": ["lin0"], "bias": "all"}, ["lin0"]),
    "lora_bias": ({"lora_bias": True}, ["lin1"]),
}


@pytest.mark.parametrize("case", list(LOAD_RESULT_CASES))
def test_load_adapter_returns_no_missing_or_unexpected_keys(case, tmp_path):
    kw, receiver_targets = LOAD_RESULT_CASES[case]
    _, src, _ = make_pair("mlp", **kw)
    _perturb(src, lambda n: dict(src.named_parameters())[n].requires_grad)
    src.save_pretrained(tmp_path)
    expected = _eval_out(src, "mlp")
    _, r, i = make_pair("mlp", target_modules=receiver_targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res_r = r.load_adapter(str(tmp_path), adapter_name="two")
        res_i = i.load_adapter(str(tmp_path), adapter_name="two")
    for res in (res_r, res_i):
        assert hasattr(res, "missing_keys") and hasattr(res, "unexpected_keys")
    assert list(res_i.missing_keys) == list(res_r.missing_keys) == []
    assert list(res_i.unexpected_keys) == list(res_r.unexpected_keys) == []
    set_active(r, "two")
    set_active(i, "two")
    assert_close(_eval_out(i, "mlp"), _eval_out(r, "mlp"))
    assert_close(_eval_out(i, "mlp"), expected)
