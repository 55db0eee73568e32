"""LoRA's `ensure_weight_tying` on a model whose lm_head shares the input embedding's weight, against PEFT: the
config PEFT rewrites, the shared copy or factors, the files both ways, training, warnings and refusals."""
import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tiny_models import AGAINST_PEFT, assert_close, assert_same_params, copy_weights, impl, peft_fast_only, ref

IDS = torch.tensor([[3, 17, 5, 60, 2, 9], [8, 1, 33, 4, 61, 12]])
CASES = {
    "target-embed": {"target_modules": ["embed_tokens", "q_proj"]},
    "target-lm_head": {"target_modules": ["lm_head", "v_proj"]},
    "target-regex": {"target_modules": r".*(embed_tokens|q_proj)"},
    "save-embed": {"modules_to_save": ["embed_tokens"], "target_modules": ["q_proj"]},
    "save-lm_head": {"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]},
}
_BASE = {}


def tied_llama(tie: bool = True):
    if tie not in _BASE:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BASE[tie] = LlamaForCausalLM(LlamaConfig(
                vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=tie, pad_token_id=0))
    return copy.deepcopy(_BASE[tie])


def wrap(lib, adapter_name="default", model=None, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(tied_llama() if model is None else model,
                                  lib.LoraConfig(r=4, lora_alpha=8, ensure_weight_tying=True, **copy.deepcopy(cfg)),
                                  adapter_name=adapter_name)


def pair(**cfg):
    """PEFT's model with its trainable numbers moved off their initial values, and the implementation's with the
    same numbers (the tied ones are one storage in both, so copying both names writes the same values twice)."""
    ref_model, impl_model = wrap(ref, **cfg), wrap(impl, **cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(ref_model.named_parameters()):
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    copy_weights(ref_model, impl_model)
    return ref_model, impl_model


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def saved(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(path, "adapter_model.safetensors"))


def load(lib, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(tied_llama(), path)


@pytest.mark.parametrize("case", list(CASES))
def test_tied_adapter_matches_peft(case, tmp_path):
    ref_model, impl_model = pair(**CASES[case])
    assert_same_params(ref_model, impl_model)  # PEFT lists a tied LoRA factor under both layers, a shared copy once
    assert_close(logits(impl_model), logits(ref_model))
    ref_cfg, ref_file = saved(ref_model, tmp_path / "ref")
    impl_cfg, impl_file = saved(impl_model, tmp_path / "impl")
    for key in ("target_modules", "modules_to_save", "ensure_weight_tying"):  # PEFT's rewritten lists
        want, got = ref_cfg[key], impl_cfg[key]
        assert (sorted(got) == sorted(want)) if isinstance(want, list) else got == want, key
    assert sorted(impl_file) == sorted(ref_file)
    for k in ref_file:
        assert_close(impl_file[k], ref_file[k], msg=k)
    assert_close(logits(load(impl, tmp_path / "ref")), logits(ref_model))
    assert_close(logits(load(ref, tmp_path / "impl")), logits(ref_model))


@pytest.mark.parametrize("case", ["target-embed", "save-lm_head"])
def test_training_updates_both_tied_layers_as_peft(case):
    ref_model, impl_model = pair(**CASES[case])
    for model in (ref_model, impl_model):
        params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        for _ in range(2):
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
    assert_close(logits(impl_model), logits(ref_model), atol=1e-4, rtol=1e-4)
    inner = impl_model.base_model.model
    if case == "target-embed":  # lm_head's factors still are the embedding's, after the optimizer's steps
        emb = inner.model.embed_tokens
        assert torch.equal(inner.lm_head.lora_A["default"].weight, emb.lora_embedding_B["default"].t())
        assert torch.equal(inner.lm_head.lora_B["default"].weight, emb.lora_embedding_A["default"].t())
    else:
        assert inner.lm_head.modules_to_save["default"].weight is inner.model.embed_tokens.modules_to_save[
            "default"].weight


@peft_fast_only
def test_merge_adds_the_tied_delta_once(tmp_path):
    """Deliberate difference: PEFT merges the tied lm_head's delta into the weight it shares with the embedding
    after the embedding's own merge added the same delta, so its merged model differs from the unmerged one."""
    ref_model, impl_model = pair(**CASES["target-embed"])
    want = logits(impl_model)
    impl_model.merge_adapter()
    assert_close(logits(impl_model), want, atol=1e-4, rtol=1e-4)
    impl_model.unmerge_adapter()
    assert_close(logits(impl_model), want, atol=1e-4, rtol=1e-4)
    merged = impl_model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert_close(logits(merged), want, atol=1e-4, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = ref_model.merge_and_unload()
    assert (logits(peft_merged) - want).abs().max() > 1e-2  # PEFT's double merge (if this fails, PEFT fixed it)


@peft_fast_only
def test_tie_survives_conversion_and_serves_mixed_batches():
    model = wrap(impl, **CASES["target-embed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", impl.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                   ensure_weight_tying=True, target_modules=["embed_tokens"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    model = model.to(torch.float64)
    lm_head, emb = model.base_model.model.lm_head, model.base_model.model.model.embed_tokens
    for name in ("default", "other"):
        assert lm_head.lora_A[name].weight.dtype == torch.float64
        assert lm_head.lora_A[name].weight.data_ptr() == emb.lora_embedding_B[name].data_ptr()
        assert lm_head.lora_B[name].weight.data_ptr() == emb.lora_embedding_A[name].data_ptr()
    model.eval()
    singles = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        singles[name] = logits(model)
    mixed = logits(model, adapter_names=["other", "default"])
    assert_close(mixed[0], singles["other"][0])
    assert_close(mixed[1], singles["default"][1])
    with torch.no_grad():  # a change made through the embedding is seen by lm_head's next batch
        emb.lora_embedding_A["other"].mul_(2)
    model.set_adapter("other")
    again = logits(model)
    assert (again - singles["other"]).abs().max() > 1e-3
    assert_close(logits(model, adapter_names=["other", "other"]), again)
    model.delete_adapter("other")
    assert "other" not in lm_head.tied_adapters and "other" not in lm_head.lora_A


def test_tied_layers_without_ensure_weight_tying_warn_as_peft():
    for lib in (ref, impl):
        with pytest.warns(UserWarning, match="ensure_weight_tying` is not set to True"):
            lib.get_peft_model(tied_llama(), lib.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))


def test_ensure_weight_tying_on_an_untied_model_warns_as_peft():
    for lib in (ref, impl):
        with pytest.warns(UserWarning, match="no tied modules were found"):
            lib.get_peft_model(tied_llama(tie=False), lib.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                                      ensure_weight_tying=True))
        with pytest.warns(UserWarning, match="no tied modules are added"):
            lib.get_peft_model(tied_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"],
                                                             ensure_weight_tying=True))


def test_different_token_rows_for_tied_layers_are_refused_as_peft():
    spec = {"embed_tokens": [1, 2], "lm_head": [3, 4]}
    for lib in (ref, impl):
        with pytest.raises(ValueError, match="Cannot ensure weight tying"):
            lib.get_peft_model(tied_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"], ensure_weight_tying=True,
                                                             trainable_token_indices=spec))


@peft_fast_only
def test_tied_refusals_leave_the_model_unchanged():
    model = tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="rewrites the base weight"):
            impl.get_peft_model(model, impl.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights="olora",
                                                       ensure_weight_tying=True))
        with pytest.raises(ValueError, match="does not adapt"):
            impl.get_peft_model(model, impl.LoraConfig(r=4, target_modules=["lm_head", "q_proj"],
                                                       exclude_modules=["embed_tokens"], ensure_weight_tying=True))
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    dora = wrap(impl, use_dora=True, init_lora_weights=False, **CASES["target-embed"])
    with pytest.raises(ValueError, match="DoRA adapter"):
        dora.merge_adapter()
    assert not dora.base_model.model.lm_head.merged and not dora.base_model.model.model.embed_tokens.merged


@pytest.mark.skipif(AGAINST_PEFT, reason="checks the implementation's rewritten config only")
def test_config_records_the_flag():
    cfg = impl.LoraConfig(r=4, target_modules=["q_proj"], ensure_weight_tying=True)
    assert cfg.to_dict()["ensure_weight_tying"] is True
    assert impl.LoraConfig.from_dict(cfg.to_dict()).ensure_weight_tying is True


def test_optimizer_built_before_model_to_keeps_training_both_layers():
    """Trainer and Accelerate build the optimizer, then call model.to(): the tied factors must stay the parameters
    the optimizer holds (a copy would leave lm_head's share of the gradient unapplied), as in PEFT."""
    ref_model, impl_model = pair(**CASES["target-embed"])
    for model in (ref_model, impl_model):
        params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=0.05)
        model.to(torch.float32)
        assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
        for _ in range(2):
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
    assert_close(logits(impl_model), logits(ref_model), atol=1e-4, rtol=1e-4)


@peft_fast_only
def test_deep_copies_and_pickles_stay_tied():
    import pickle

    model = wrap(impl, init_lora_weights=False, **CASES["target-embed"])
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        lm_head, emb = clone.base_model.model.lm_head, clone.base_model.model.model.embed_tokens
        assert lm_head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
        assert lm_head.lora_B["default"].weight.data_ptr() == emb.lora_embedding_A["default"].data_ptr()
        assert_close(logits(clone), logits(model))
        before = lm_head.lora_A["default"].weight._version
        with torch.no_grad():  # an edit through the embedding is one the lm_head factor's caches see
            emb.lora_embedding_B["default"].mul_(1.0)
        assert lm_head.lora_A["default"].weight._version > before


@pytest.mark.parametrize("patterns", [{"rank_pattern": {"lm_head": 8}}, {"alpha_pattern": {"lm_head": 32}},
                                      {"rank_pattern": {"embed_tokens": 2}, "use_rslora": True}])
def test_patterns_on_tied_layers_scale_as_in_peft(patterns, tmp_path):
    """PEFT gives the tied lm_head its own pattern's scaling over the embedding's factors."""
    ref_model, impl_model = pair(**CASES["target-embed"], **patterns)
    assert_close(logits(impl_model), logits(ref_model), atol=1e-4, rtol=1e-4)
    saved(ref_model, tmp_path)
    assert_close(logits(load(impl, tmp_path)), logits(ref_model), atol=1e-4, rtol=1e-4)


def test_t5_embeddings_sharing_the_table_get_their_own_adapters_as_in_peft():
    """T5 ties its encoder's and decoder's embed_tokens (and lm_head) to `shared`: the embeddings get their own
    adapters, lm_head the shared one's factors."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_decoder_layers=1, num_heads=4, tie_word_embeddings=True))
    ids = IDS[:, :5]
    out = {}
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
                r=2, target_modules=["embed_tokens", "q"], ensure_weight_tying=True, init_lora_weights=False))
        out[lib.__name__] = model.eval()  # T5's dropout
    copy_weights(out["peft"], out[impl.__name__])
    with torch.no_grad():
        want = out["peft"](input_ids=ids, decoder_input_ids=ids).logits
        got = out[impl.__name__](input_ids=ids, decoder_input_ids=ids).logits
    assert_close(got, want, atol=1e-4, rtol=1e-4)


@peft_fast_only
def test_a_model_whose_embedding_is_not_called_embed_tokens_reloads_tied(tmp_path):
    """Deliberate difference: GPT-2's embedding is transformer.wte, the name PEFT writes into the config; PEFT then
    ties nothing when loading its own file (it drops lm_head's factors). Here the embedding's path counts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = impl.get_peft_model(copy.deepcopy(base), impl.LoraConfig(
            r=2, target_modules=["lm_head"], ensure_weight_tying=True, init_lora_weights=False))
        model.save_pretrained(tmp_path)
        back = impl.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert back.base_model.model.lm_head.tied_adapters
    assert_close(logits(back), logits(model.eval()))  # GPT-2's dropout


def test_combining_adapters_created_with_a_peft_only_init(tmp_path):
    model = wrap(impl, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["init_lora_weights"] = "eva"  # as PEFT writes an EVA adapter (its weights carry no config copy)
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    save_file(load_file(str(tmp_path / "adapter_model.safetensors")), str(tmp_path / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = impl.PeftModel.from_pretrained(tied_llama(), str(tmp_path))
        loaded.load_adapter(str(tmp_path), "b")
        loaded.add_weighted_adapter(["default", "b"], [1.0, 0.0], "mix", combination_type="linear")
    loaded.set_adapter("mix")
    assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


def test_a_plain_wte_target_is_not_tied_as_in_peft(tmp_path):
    """GPT-2's embedding named by the user ("wte", not PEFT's names): PEFT ties nothing, and its files load here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16))
    models = {}
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[lib.__name__] = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
                r=2, target_modules=["wte", "c_attn"], ensure_weight_tying=True, init_lora_weights=False)).eval()
    copy_weights(models["peft"], models[impl.__name__])
    assert_close(logits(models[impl.__name__]), logits(models["peft"]))
    saved(models["peft"], tmp_path)
    assert_close(logits(_load_on(base, tmp_path)), logits(models["peft"]))


def _load_on(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return impl.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


@peft_fast_only
def test_model_to_keeps_gradients_and_works_with_a_live_graph():
    """model.to() while a graph holds the tied factors, and after a backward: no error, gradients kept."""
    model = wrap(impl, init_lora_weights=False, **CASES["target-embed"])
    loss = model(input_ids=IDS, labels=IDS).loss
    model.to(torch.float32)  # the graph of `loss` is alive
    loss.backward()
    lm_head = model.base_model.model.lm_head
    grad = lm_head.lora_A["default"].weight.grad.clone()
    model.to(torch.float64)
    assert lm_head.lora_A["default"].weight.grad is not None
    assert_close(lm_head.lora_A["default"].weight.grad, grad.double())
    assert lm_head.lora_A["default"].weight.data_ptr() == \
        model.base_model.model.model.embed_tokens.lora_embedding_B["default"].data_ptr()


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_decoder_layers=1, num_heads=4, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("cfg", [{"target_modules": ["lm_head", "q"]}, {"target_modules": ["embed_tokens", "q"]},
                                 {"modules_to_save": ["lm_head"], "target_modules": ["q"]}],
                         ids=["lm_head", "embed_tokens", "save-lm_head"])
@peft_fast_only  # PEFT reloads these with a different model (its rule misses `shared`)
def test_t5_tied_adapters_reload(cfg, tmp_path):
    """T5's embedding is the top-level `shared`, the name PEFT's rewrite saves in the config: the file's own keys
    say which layers it adapts."""
    base = _t5()
    ids = IDS[:, :5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = impl.get_peft_model(copy.deepcopy(base), impl.LoraConfig(
            r=2, ensure_weight_tying=True, init_lora_weights=False, **copy.deepcopy(cfg))).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.1)
        model.save_pretrained(tmp_path)
        back = impl.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert_close(back(input_ids=ids, decoder_input_ids=ids).logits,
                     model(input_ids=ids, decoder_input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [{"target_modules": ["transformer.wte", "c_attn"]},
                                 {"modules_to_save": ["transformer.wte"], "target_modules": ["c_attn"]}],
                         ids=["target", "save"])
def test_a_user_written_full_embedding_path_loads_as_in_peft(cfg, tmp_path):
    """PEFT ties nothing when a user names GPT-2's embedding by its path; its file then holds no lm_head adapter
    and loads untied here too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(
            r=2, ensure_weight_tying=True, init_lora_weights=False, **copy.deepcopy(cfg))).eval()
        model.save_pretrained(tmp_path)
        back = impl.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert_close(logits(back), logits(model))


@peft_fast_only
def test_combining_tied_adapters_is_refused_unchanged():
    """One set of factors serves the embedding and lm_head: combinations written into each layer would overwrite
    each other (PEFT's merged adapter leaves lm_head out, untying the two layers). Refused before anything changes."""
    model = wrap(impl, init_lora_weights=False, **CASES["target-embed"])
    before = logits(model)
    names = sorted(n for n, _ in model.named_parameters())
    with pytest.raises(NotImplementedError, match=r"\['default'\].*ensure_weight_tying"):
        model.add_weighted_adapter(["default"], [0.5], "merged", combination_type="cat")
    assert list(model.peft_config) == ["default"]
    assert sorted(n for n, _ in model.named_parameters()) == names
    assert torch.equal(logits(model), before)
