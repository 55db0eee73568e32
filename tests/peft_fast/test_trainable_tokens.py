"""LoraConfig.trainable_token_indices: chosen embedding rows trained beside the adapter, as PEFT 0.21 does it. The same
parameters and counts, initial rows, outputs and gradients (the tied output layer's too), files in both directions,
merging and unloading, disabling, several adapters and mixed batches; and files that do not fit load nothing."""
import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import (AGAINST_PEFT, assert_close, assert_unchanged, copy_weights, impl, name_diff, param_table,
                         peft_fast_only, raises_like_peft, ref, snapshot)
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "v_proj"]
SPECS = {
    "list": [1, 3, 5],
    "dict": {"embed_tokens": [2, 7]},
    "padding-row": [0, 4],  # the padding row gets no gradient (F.embedding's rule on PEFT's patched table)
    "both-same": {"embed_tokens": [1, 2], "lm_head": [1, 2]},  # tied model: one set of rows, the output tied to it
    "both-differ": {"embed_tokens": [1, 2], "lm_head": [9]},  # each layer trains its own rows
}
TIES = pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
X = torch.tensor([[1, 3, 5, 0, 4, 2, 7, 9], [9, 7, 2, 1, 63, 5, 3, 0], [4, 4, 1, 2, 3, 6, 8, 0]])
_BASES: dict = {}


def base(tie: bool):
    if tie not in _BASES:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=tie)
        _BASES[tie] = LlamaForCausalLM(cfg)
    return copy.deepcopy(_BASES[tie])


def config(lib, tokens, **kw):
    kw = {"target_modules": list(TARGETS), "r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw}
    return lib.LoraConfig(trainable_token_indices=copy.deepcopy(tokens), **kw)


def perturb(model, seed=0, name="default"):
    """Move an adapter's trainable rows off their initial values (a copy of the embedding's), so that they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n and n.endswith("." + name):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


def pair(tie, tokens, copy_rows=True, **kw):
    """(base, PEFT model, impl model) over copies of one base; with copy_rows, the PEFT model's (perturbed) adapter
    weights copied into the impl model."""
    b = base(tie)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        r = ref.get_peft_model(copy.deepcopy(b), config(ref, tokens, **kw))
        torch.manual_seed(0)
        i = impl.get_peft_model(copy.deepcopy(b), config(impl, tokens, **kw))
    if copy_rows:
        perturb(r)
        copy_weights(r, i)
    return b, r, i


def add_both(r, i, name, tokens, seed=1, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.add_adapter(name, config(ref, tokens, **kw))
        i.add_adapter(name, config(impl, tokens, **kw))
    perturb(r, seed, name)
    copy_weights(r, i)


def logits(model, x=X, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def rows(model):
    return {n: p for n, p in model.named_parameters() if "trainable_tokens_delta" in n}


# ------------------------------------------------------------------------------------------- creation and training
@TIES
@pytest.mark.parametrize("spec", SPECS)
def test_same_parameters_counts_and_wrappers(tie, spec, capsys):
    _, r, i = pair(tie, SPECS[spec], copy_rows=False)
    assert param_table(r) == param_table(i), name_diff(param_table(r), param_table(i))
    assert set(r.state_dict()) == set(i.state_dict()), name_diff(r.state_dict(), i.state_dict())
    assert set(dict(r.named_buffers())) == set(dict(i.named_buffers()))
    assert r.get_nb_trainable_parameters() == i.get_nb_trainable_parameters()
    r.print_trainable_parameters()
    i.print_trainable_parameters()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == printed[1]
    for path in ("model.embed_tokens", "lm_head"):
        rm, im = r.base_model.model.get_submodule(path), i.base_model.model.get_submodule(path)
        assert type(rm).__name__ == type(im).__name__, path
        if hasattr(rm, "token_adapter"):
            assert (rm.token_adapter.tied_adapter is None) == (im.token_adapter.tied_adapter is None), path


@TIES
@pytest.mark.parametrize("spec", ["list", "both-differ"])
def test_rows_start_as_the_embeddings_and_change_nothing(tie, spec):
    b, r, i = pair(tie, SPECS[spec], copy_rows=False, init_lora_weights=True)
    for (n, rp), (m, ip) in zip(rows(r).items(), rows(i).items()):
        assert n == m and torch.equal(rp, ip), n
    assert_close(logits(i), logits(b))  # a tied output layer recomputes its trainable columns: rounding only


@TIES
@pytest.mark.parametrize("spec", SPECS)
def test_forward_and_gradients(tie, spec):
    _, r, i = pair(tie, SPECS[spec])
    outs = [m(input_ids=X, labels=X) for m in (r, i)]
    assert_close(outs[1].logits, outs[0].logits)
    for o in outs:
        o.loss.backward()
    ip = dict(i.named_parameters())
    for n, p in r.named_parameters():
        if p.requires_grad:
            assert_close(ip[n].grad, p.grad, msg=n)
    if spec == "padding-row" and not tie:  # token 0 is the padding row: like PEFT, its row gets no gradient
        delta = ip["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
        assert delta.grad[0].abs().sum() == 0 and delta.grad[1].abs().sum() > 0


def test_rows_are_float32_on_a_bf16_model_like_peft():
    for autocast in (True, False):
        b = base(False).to(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = ref.get_peft_model(copy.deepcopy(b), config(ref, [1, 2]), autocast_adapter_dtype=autocast)
            i = impl.get_peft_model(copy.deepcopy(b), config(impl, [1, 2]), autocast_adapter_dtype=autocast)
        assert {n: p.dtype for n, p in rows(r).items()} == {n: p.dtype for n, p in rows(i).items()}
        perturb(r)
        copy_weights(r, i)
        assert_close(logits(i), logits(r), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------------------ files
@TIES
@pytest.mark.parametrize("spec", ["list", "both-same", "both-differ"])
def test_files_move_both_ways(tie, spec, tmp_path):
    _, r, i = pair(tie, SPECS[spec])
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    rw, iw = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ref", "impl"))
    assert set(iw) == set(rw), name_diff(rw, iw)
    assert any("trainable_tokens_delta" in k for k in rw)
    for k in rw:
        assert iw[k].dtype == rw[k].dtype and torch.equal(iw[k], rw[k]), k
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ref", "impl")]
    assert configs[0]["trainable_token_indices"] == configs[1]["trainable_token_indices"] == SPECS[spec]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ref = impl.PeftModel.from_pretrained(base(tie), str(tmp_path / "ref"), is_trainable=True)
        from_impl = ref.PeftModel.from_pretrained(base(tie), str(tmp_path / "impl"), is_trainable=True)
    expected = logits(r)
    assert_close(logits(from_ref), expected)
    assert_close(logits(from_impl), expected)
    assert param_table(from_ref) == param_table(from_impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = [lib.PeftModel.from_pretrained(base(tie), str(tmp_path / "ref")) for lib in (impl, ref)]
    assert param_table(frozen[0]) == param_table(frozen[1])
    from_state = impl.get_peft_model_state_dict(i, state_dict=i.state_dict())
    assert {k: v.shape for k, v in from_state.items()} == {k: v.shape for k, v in iw.items()}


def test_several_adapters_in_files(tmp_path):
    _, r, i = pair(True, [1, 3, 5])
    add_both(r, i, "other", {"embed_tokens": [2, 9], "lm_head": [2, 9]})
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    for sub in ("", "other"):
        rw, iw = (load_file(tmp_path / d / sub / "adapter_model.safetensors") for d in ("ref", "impl"))
        assert set(iw) == set(rw) and all(torch.equal(iw[k], rw[k]) for k in rw), sub
    _, r2, i2 = pair(True, [1, 3, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        i2.load_adapter(str(tmp_path / "ref" / "other"), "other")
        r2.load_adapter(str(tmp_path / "impl" / "other"), "other")
        i2.load_adapter(str(tmp_path / "ref"), "default")  # overwrites the existing adapter's rows
    assert param_table(r2) == param_table(i2)
    for name in ("default", "other"):
        for m in (r, i, r2, i2):
            m.set_adapter(name)
        assert_close(logits(i2), logits(r), msg=name)
        assert_close(logits(r2), logits(i), msg=name)


@peft_fast_only
def test_a_file_that_does_not_fit_loads_nothing(tmp_path, monkeypatch):
    _, _, i = pair(False, [1, 3, 5])
    i.save_pretrained(tmp_path)
    path, weights = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    data, tensors = json.loads(path.read_text()), load_file(weights)
    target = base(False)
    model = pair(False, [2, 4])[2]
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    # as PEFT writes files (no copy of the config inside): rows that do not fit the config, indices outside the layer
    for indices, rows_kept, error, words in (([1, 3, 5], 2, ValueError, "trainable_tokens_delta"),
                                             ([1, 3, 64], 3, IndexError, "64")):
        path.write_text(json.dumps({**data, "trainable_token_indices": indices}))
        save_file({**tensors, key: tensors[key][:rows_kept].contiguous()}, weights, metadata={"format": "pt"})
        before, before_model = snapshot(target), snapshot(model)
        with pytest.raises(error, match=words):
            impl.PeftModel.from_pretrained(target, str(tmp_path))
        with pytest.raises(error, match=words):
            model.load_adapter(str(tmp_path), "other")
        assert_unchanged(target, before)
        assert_unchanged(model, before_model)
    path.write_text(json.dumps(data))  # a good file, and a failure while copying its tensors: rolled back
    save_file(tensors, weights, metadata={"format": "pt"})
    import peft_fast.tuners.base_model as tuner_base

    monkeypatch.setattr(tuner_base, "load_adapter_tensors", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        model.load_adapter(str(tmp_path), "other")
    assert_unchanged(model, before_model)


# ---------------------------------------------------------------------------------------------- merging, disabling
@TIES
def test_merge_and_unload_writes_the_rows(tie):
    _, r, i = pair(tie, [1, 3, 5])
    expected = logits(r)
    rm, im = r.merge_and_unload(), i.merge_and_unload()
    assert type(im.model.embed_tokens) is torch.nn.Embedding and type(im.lm_head) is torch.nn.Linear
    assert torch.equal(im.model.embed_tokens.weight, rm.model.embed_tokens.weight)
    assert torch.equal(im.lm_head.weight, rm.lm_head.weight)
    assert (im.lm_head.weight is im.model.embed_tokens.weight) == tie
    assert_close(logits(im), expected)


@TIES
def test_unload_drops_the_rows(tie):
    b, r, i = pair(tie, [1, 3, 5])
    iu, ru = i.unload(), r.unload()
    assert torch.equal(iu.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert_close(logits(iu), logits(ru), atol=0, rtol=0)
    assert_close(logits(iu), logits(b), atol=0, rtol=0)


@TIES
def test_merge_adapter_then_unmerge(tie):
    b, r, i = pair(tie, [1, 3, 5])
    expected = logits(r)
    r.merge_adapter()
    i.merge_adapter()
    assert torch.equal(i.base_model.model.model.embed_tokens.token_adapter.base_layer.weight,
                       r.base_model.model.model.embed_tokens.token_adapter.base_layer.weight)
    assert_close(logits(i), expected)
    i.unmerge_adapter()
    assert torch.equal(i.base_model.model.model.embed_tokens.token_adapter.base_layer.weight,
                       b.model.embed_tokens.weight)
    assert_close(logits(i), expected)


@peft_fast_only
def test_a_refused_safe_merge_changes_nothing():
    _, _, i = pair(True, [1, 3, 5])
    with torch.no_grad():
        next(iter(rows(i).values()))[0, 0] = float("nan")
    weights = {n: p.detach().clone() for n, p in i.named_parameters() if "trainable_tokens" not in n}
    modules = [type(m) for m in i.modules()]
    with pytest.raises(ValueError, match="NaN"):
        i.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match="NaN"):
        i.merge_and_unload(safe_merge=True)
    assert [type(m) for m in i.modules()] == modules
    assert all(torch.equal(p, weights[n]) for n, p in i.named_parameters() if n in weights)
    assert not any(getattr(m, "merged", False) for m in i.modules())


@TIES
def test_disable_adapter_gives_the_base(tie):
    b, r, i = pair(tie, [1, 3, 5])
    with i.disable_adapter(), r.disable_adapter():
        assert_close(logits(i), logits(b), atol=0, rtol=0)
        assert_close(logits(r), logits(b), atol=0, rtol=0)
    assert_close(logits(i), logits(r))


# ------------------------------------------------------------------------------------------------ several adapters
@TIES
def test_several_adapters_set_and_delete(tie):
    _, r, i = pair(tie, [1, 3, 5])
    add_both(r, i, "other", [2, 9])
    assert param_table(r) == param_table(i)
    for name in ("other", "default"):
        r.set_adapter(name)
        i.set_adapter(name)
        assert param_table(r) == param_table(i), name
        assert_close(logits(i), logits(r), msg=name)
    r.delete_adapter("default")
    i.delete_adapter("default")
    assert i.active_adapters == r.active_adapters == ["other"]
    assert param_table(r) == param_table(i)
    assert_close(logits(i), logits(r))


@TIES
def test_mixed_batch(tie):
    _, r, i = pair(tie, [1, 3, 5])
    add_both(r, i, "other", [2, 9])
    r.eval()
    i.eval()
    names = ["default", "other", "__base__"]
    mixed = logits(i, adapter_names=names)
    assert_close(mixed, logits(r, adapter_names=names))
    for row, name in enumerate(names[:2]):
        i.set_adapter(name)
        assert_close(mixed[row], logits(i)[row], msg=name)


def test_two_token_adapters_cannot_be_active_together():
    _, r, i = pair(False, [1, 3, 5])
    add_both(r, i, "other", [2, 9])
    raises_like_peft(ValueError, ["only one adapter can be set at a time"],
                     lambda: i.base_model.set_adapter(["default", "other"]),
                     lambda: r.base_model.set_adapter(["default", "other"]))


@peft_fast_only
def test_mixed_batch_rows_of_an_adapter_without_tokens_use_the_base_rows():
    """A deliberate difference: PEFT 0.21 fails with a KeyError on such a batch; each row is served as its adapter
    alone serves it."""
    _, _, i = pair(False, [1, 3, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        i.add_adapter("plain", config(impl, None))
    i.eval()
    mixed = logits(i, adapter_names=["default", "plain", "__base__"])
    assert_close(mixed[0], logits(i)[0])
    i.set_adapter("plain")
    assert_close(mixed[1], logits(i)[1])


# ---------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("case", [
    (ValueError, ["not found"], {"trainable_token_indices": {"nope": [1]}}),
    (TypeError, ["trainable_token_indices cannot be applied"],
     {"trainable_token_indices": {"lm_head": [1]}, "target_modules": ["q_proj", "lm_head"]}),
    (ValueError, ["already marked to be trained fully"], {"modules_to_save": ["model.embed_tokens"]}),
    (IndexError, ["out of"], {"trainable_token_indices": [1, 100]}),
], ids=["not-found", "also-targeted", "also-saved", "out-of-range"])
def test_refused_like_peft(case):
    error, words, kw = case
    kw = {"trainable_token_indices": [1, 2], **kw}
    tokens = kw.pop("trainable_token_indices")
    b = base(False)
    before = snapshot(b)
    raises_like_peft(error, words, lambda: impl.get_peft_model(b, config(impl, tokens, **kw)),
                     lambda: ref.get_peft_model(base(False), config(ref, tokens, **kw)))
    if not AGAINST_PEFT:
        assert_unchanged(b, before)


@peft_fast_only
@pytest.mark.parametrize("bad", [[1, -2], [3, 1, 3], {1, 2}, {"": [1]}, {"embed_tokens": [4, 4]}, "12"])
def test_config_checks(bad):
    with pytest.raises((ValueError, TypeError)):
        impl.LoraConfig(target_modules=TARGETS, trainable_token_indices=bad)


@peft_fast_only
@pytest.mark.parametrize("spec", ["list", "both-differ"])
def test_config_round_trips(spec):
    cfg = config(impl, SPECS[spec])
    assert impl.LoraConfig.from_dict(json.loads(cfg.to_json_string())).trainable_token_indices == SPECS[spec]
    assert cfg.to_peft().trainable_token_indices == SPECS[spec]
    assert impl.PeftConfig.from_peft(config(ref, SPECS[spec])).trainable_token_indices == SPECS[spec]


def test_add_weighted_adapter_gives_the_new_adapter_fresh_rows():
    """PEFT combines the LoRA weights and gives the combination its own rows (copies of the current table), rather
    than refusing the wrappers as shared modules_to_save."""
    models = {}
    for lib in (ref, impl):
        torch.manual_seed(0)
        m = lib.get_peft_model(base(False), config(lib, [1, 2]))
        torch.manual_seed(1)
        m.add_adapter("b", config(lib, [1, 2]))
        models[lib] = m
    copy_weights(models[ref], models[impl])
    for m in models.values():
        m.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")
        m.set_adapter("mix")
    assert sorted(k for k in models[impl].state_dict() if "mix" in k) == \
        sorted(k for k in models[ref].state_dict() if "mix" in k)
    assert_close(models[impl](input_ids=X).logits, models[ref](input_ids=X).logits)
