"""LoRA on torch's nn.Embedding (lora.Embedding) against PEFT 0.21.2, on a tiny Llama (embed_tokens, with q_proj
and lm_head beside it): parameters and init under one seed, forward and gradients of every LoRA parameter (the
padding row included), files both ways (with the base tables PEFT's save_embedding_layers="auto" saves), merging,
several adapters, mixed batches, DoRA, an `embed_scale` base, and refusals."""
import copy
import warnings

import pytest
import torch
from lycoris_pairs import assert_eval_matches, assert_same_files, assert_train_step_matches
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from merge_checks import WEIGHTED_TYPES, check_merge_round_trip, merged_deltas
from tiny_models import assert_close, assert_same_params, assert_same_state, assert_unchanged, copy_weights, \
    impl, out, peft_fast_only, perturb_magnitudes, raises_like_peft, ref, set_active, snapshot

TARGETS = ["embed_tokens", "q_proj"]
CASES = [
    {},
    {"init_lora_weights": True},  # A = 0, B ~ N(0, 1): an identity adapter whose A still gets gradients
    {"init_lora_weights": "gaussian"},
    {"target_modules": ["embed_tokens"], "use_rslora": True, "lora_alpha": 16},
    {"rank_pattern": {"embed_tokens": 2}, "alpha_pattern": {"embed_tokens": 5}},
    {"lora_dropout": 0.3},  # PEFT applies no dropout to embeddings (q_proj's dropout runs)
    {"target_modules": ["embed_tokens", "lm_head"]},
    {"use_dora": True},
]
IDS = ["-".join(f"{k}={v}" for k, v in kw.items()) or "default" for kw in CASES]
_BASE: dict = {}


def llama() -> LlamaForCausalLM:
    if not _BASE:
        torch.manual_seed(0)
        _BASE["llama"] = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0))
    return copy.deepcopy(_BASE["llama"])


def ids(batch: int = 3, seq: int = 6, seed: int = 1) -> dict:
    x = torch.randint(1, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 0  # the padding row: its lookups give A no gradient, in both libraries
    return {"input_ids": x}


def cfg(**kw) -> dict:
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": list(TARGETS), **kw}


def build(base=None, seed: int = 0, **kw):
    """(PEFT model, implementation model) under one seed, each with its own config object."""
    base = llama() if base is None else base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        r = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**cfg(**kw)))
        torch.manual_seed(seed)
        i = impl.get_peft_model(copy.deepcopy(base), impl.LoraConfig(**cfg(**kw)))
    return r, i


def pair(**kw):
    r, i = build(**kw)
    if kw.get("use_dora"):
        perturb_magnitudes(r, i)  # a fresh magnitude makes DoRA's scale exactly 1
    copy_weights(r, i)
    return r, i


def add_both(ref_model, impl_model, name: str, seed: int, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref_model.add_adapter(name, ref.LoraConfig(**cfg(**kw)))
        torch.manual_seed(seed)
        impl_model.add_adapter(name, impl.LoraConfig(**cfg(**kw)))
    copy_weights(ref_model, impl_model)


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_parameters_and_init_match_peft(kw):
    r, i = build(**kw)
    assert_same_params(r, i)
    # The draws are PEFT's (randn for both factors, then its init); DoRA's magnitude is a norm (rounding).
    tol = 1e-6 if kw.get("use_dora") else 0
    assert_same_state(r, i, atol=tol, rtol=tol)
    assert [s.module_type for s in i.get_layer_status()] == [s.module_type for s in r.get_layer_status()]
    assert "lora.Embedding" in [s.module_type for s in i.get_layer_status()]
    mine, peft_config = i.peft_config["default"].to_dict(), r.peft_config["default"].to_dict()
    assert {k: v for k, v in mine.items() if k != "peft_version"} == \
        {k: peft_config.get(k) for k in mine if k != "peft_version"}


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_forward_and_gradients_match_peft(kw):
    r, i = pair(**kw)
    x = ids()
    assert_train_step_matches("llama", r, i, x, steps=2)
    assert_same_state(r, i)
    assert_eval_matches("llama", r, i, x)
    with torch.no_grad():  # a second eval call (DoRA's cached scale) gives the same
        assert_close(out(i, x), out(r, x))


def test_padding_row_gets_no_gradient():
    r, i = pair()
    for m in (r, i):
        m.train()
        m(**ids(), labels=ids()["input_ids"]).loss.backward()
    grads = [m.base_model.model.model.embed_tokens.lora_embedding_A["default"].grad for m in (r, i)]
    assert_close(grads[1], grads[0])
    assert torch.count_nonzero(grads[1][:, 0]) == 0 and torch.count_nonzero(grads[1]) > 0


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_files_both_ways(dora, tmp_path):
    """Two adapters saved by each library: the same files, the base tables of the adapted embedding and lm_head
    included; each library loads the other's with equal outputs."""
    r, i = pair(use_dora=dora, target_modules=["embed_tokens", "q_proj", "lm_head"])
    add_both(r, i, "second", seed=2, target_modules=["embed_tokens", "v_proj"], r=2, use_dora=dora)
    for m in (r, i):
        m.save_pretrained(tmp_path / ("ref" if m is r else "impl"))
    for sub in ("", "second"):
        assert_same_files(tmp_path / "impl" / sub, tmp_path / "ref" / sub)
    keys = set(load_file(tmp_path / "impl" / "adapter_model.safetensors"))
    emb = "base_model.model.model.embed_tokens."
    assert {emb + "lora_embedding_A", emb + "lora_embedding_B", emb + "base_layer.weight",
            "base_model.model.lm_head.base_layer.weight"} <= keys
    x = ids()
    r.eval()
    with torch.no_grad():
        want = {"default": out(r, x)}
        r.set_adapter("second")
        want["second"] = out(r, x)
    for src in ("ref", "impl"):
        for lib in (impl, ref):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = lib.PeftModel.from_pretrained(llama(), str(tmp_path / src))
                loaded.load_adapter(str(tmp_path / src / "second"), adapter_name="second")
            with torch.no_grad():
                assert_close(out(loaded, x), want["default"], msg=f"{src} -> {lib.__name__}")
                loaded.set_adapter("second")
                assert_close(out(loaded, x), want["second"], msg=f"{src} -> {lib.__name__}")


@peft_fast_only
def test_table_of_a_layer_another_adapter_adapts(tmp_path):
    """PEFT saves the tables of every adapted embedding / output layer with an adapter naming embed_tokens, also of
    a layer only another adapter adapts (here lm_head); PEFT loads such a file into a fresh model, ignoring that
    table (here tripled, so that writing it would show)."""
    r, _ = pair()
    add_both(r, build()[1], "second", seed=2, target_modules=["lm_head"])
    r.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in tensors
    tensors[key] = tensors[key] * 3
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    for lib in (ref, impl):
        fresh = llama()
        head = fresh.lm_head.weight.clone()
        loaded = lib.PeftModel.from_pretrained(fresh, str(tmp_path))
        assert torch.equal(loaded.base_model.model.lm_head.weight, head), lib.__name__


@peft_fast_only
def test_saved_base_table_is_written_back_on_load(tmp_path):
    """A file's embed_tokens table (save_embedding_layers) replaces the base model's, as PEFT's load does."""
    _, i = pair()
    with torch.no_grad():
        i.base_model.model.model.embed_tokens.base_layer.weight.mul_(2)
    i.save_pretrained(tmp_path)
    loaded = impl.PeftModel.from_pretrained(llama(), str(tmp_path))
    assert torch.equal(loaded.base_model.model.model.embed_tokens.base_layer.weight,
                       i.base_model.model.model.embed_tokens.base_layer.weight)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_and_unload(dora):
    """PEFT's merged tables (s·(B·A)ᵀ added; DoRA: columns scaled), unmerged back, two adapters merged in turn,
    merge_and_unload of a chosen adapter, unload."""
    r, i = pair(use_dora=dora)
    add_both(r, i, "other", seed=1, target_modules=["embed_tokens", "o_proj"], use_dora=dora)
    if dora:
        perturb_magnitudes(r, i, seed=1)
    x = ids()
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        _, merged_i = check_merge_round_trip(r, i, x, out)
        assert type(merged_i.model.embed_tokens) is nn.Embedding
    r, i = pair()
    assert_same_state(r.unload(), i.unload(), atol=0, rtol=0)


def test_several_adapters_set_disable_delete():
    r, i = pair()
    add_both(r, i, "other", seed=3, target_modules=["embed_tokens", "k_proj"], r=6)
    x = ids()
    for names in (["default", "other"], "other"):
        for m in (r, i):
            set_active(m, names)
        assert [n for n, p in i.named_parameters() if p.requires_grad] == \
            [n for n, p in r.named_parameters() if p.requires_grad]
        assert_train_step_matches("llama", r, i, x)
        assert_eval_matches("llama", r, i, x)
    for m in (r, i):
        m.eval()
    with torch.no_grad(), r.disable_adapter(), i.disable_adapter():
        assert_close(out(i, x), out(r, x))
        assert_close(out(i, x), llama()(**x).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (r, i):
            m.delete_adapter("other")
    assert i.active_adapters == r.active_adapters == ["default"]
    assert_same_state(r, i)
    assert_eval_matches("llama", r, i, x)


def test_mixed_batch_matches_peft():
    """`adapter_names`: each row through its adapter (PEFT's _mixed_batch_forward), in eval and with gradients."""
    r, i = pair()
    add_both(r, i, "b", seed=1, target_modules=["embed_tokens", "v_proj"], r=2)
    x = ids()
    names = ["b", "default", "__base__"]
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        assert_close(out(i, x, adapter_names=names), out(r, x, adapter_names=names))
    losses = [out(m, x, adapter_names=names).pow(2).mean() for m in (r, i)]
    for loss in losses:
        loss.backward()
    params = dict(i.named_parameters())
    for n, p in r.named_parameters():
        if p.grad is not None:
            assert_close(params[n].grad, p.grad, msg=n)


def test_refusals_like_peft():
    """lora_bias on an embedding; DoRA in a mixed batch."""
    base = llama()
    snap = snapshot(base)
    raises_like_peft(ValueError, ["lora_bias=True is not supported for Embedding"],
                     lambda: impl.get_peft_model(base, impl.LoraConfig(**cfg(lora_bias=True))),
                     lambda: ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**cfg(lora_bias=True))))
    if impl is not ref:
        assert_unchanged(base, snap)
    r, i = pair(use_dora=True, target_modules=["embed_tokens"])
    for m in (r, i):
        m.eval()
    raises_like_peft(ValueError, ["Cannot pass `adapter_names` when DoRA is enabled"],
                     lambda: out(i, ids(), adapter_names=["default"] * 3),
                     lambda: out(r, ids(), adapter_names=["default"] * 3))


class ScaledEmbedding(nn.Embedding):
    """Gemma3's scaled word embedding: the lookup times a scalar `embed_scale`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(3.5), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.embed_scale.to(self.weight.dtype)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = ScaledEmbedding(20, 8, padding_idx=1)
        self.head = nn.Linear(8, 5)

    def forward(self, X):
        return self.head(self.emb(X))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_embed_scale_scales_the_adapters_as_peft(dora):
    torch.manual_seed(0)
    base = TinyLM()
    r, i = build(base=base, target_modules=["emb", "head"], use_dora=dora)
    if dora:
        perturb_magnitudes(r, i)
    copy_weights(r, i)
    x = {"X": torch.randint(0, 20, (4, 7), generator=torch.Generator().manual_seed(3))}
    assert_train_step_matches("conv", r, i, x, steps=2)  # "conv": the loss is the squared output's mean
    assert_eval_matches("conv", r, i, x)
    if not dora:
        assert_eval_matches("conv", r, i, x, adapter_names=["default", "__base__"] * 2)


def test_all_linear_leaves_embeddings_alone():
    r, i = build(target_modules="all-linear")
    assert [s.name for s in i.get_layer_status()] == [s.name for s in r.get_layer_status()]
    assert "lora.Embedding" not in {s.module_type for s in i.get_layer_status()}


@peft_fast_only
def test_hotswap_is_refused_clearly():
    from peft_fast.tuners.lora import hotswap

    _, i = pair()
    snap = snapshot(i)
    with pytest.raises(ValueError, match="embed_tokens.*lora.Embedding"):
        hotswap.prepare_model_for_compiled_hotswap(i, target_rank=8)
    state = {k: v for k, v in i.state_dict().items() if "lora_" in k}
    with pytest.raises(ValueError, match="embed_tokens.*lora.Embedding"):
        hotswap.hotswap_adapter_from_state_dict(i, state, "default", impl.LoraConfig(**cfg()))
    assert_unchanged(i, snap)


def test_embedding_and_conv_models_run_after_deepcopy_and_pickle():
    """Plain LoRA's variant is one shared object that layers test by identity: a deep copy or pickle of the model
    (a reference model, EMA weights) must keep it, or embedding and conv layers take DoRA's path."""
    import pickle

    import peft_fast

    torch.manual_seed(0)
    emb = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Conv1d(8, 8, 3))
    model = peft_fast.get_peft_model(emb, peft_fast.LoraConfig(r=2, target_modules=["0", "1"],
                                                               init_lora_weights=False)).eval()
    ids = torch.randint(0, 20, (2, 6))

    def run(m):
        with torch.no_grad():
            return m.base_model.model[1](m.base_model.model[0](ids).transpose(1, 2))

    want = run(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(run(clone), want)
        clone.merge_adapter()
        torch.testing.assert_close(run(clone), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ctype", WEIGHTED_TYPES)
def test_add_weighted_adapter_over_embeddings_matches_peft(ctype, tmp_path):
    """The embedding's factors combined as PEFT combines lora_embedding_A/B (its SVD types on the transposed
    delta), beside q_proj's: the same deltas under one seed, outputs, and a file PEFT loads."""
    r, i = pair()
    add_both(r, i, "b", seed=3)
    for m in (r, i):
        torch.manual_seed(7)
        m.add_weighted_adapter(["default", "b"], [0.6, -0.9], "merged", combination_type=ctype, density=0.5)
    want, got = merged_deltas(r), merged_deltas(i)
    assert set(want) == set(got) and any("embed_tokens" in n for n in want)
    tol = 5e-5 if ctype == "svd" else 1e-5  # "svd": QRs of the factors here, a dense SVD in PEFT
    for n in want:
        assert_close(got[n], want[n], atol=tol, rtol=1e-5, msg=n)
    for m in (r, i):
        m.set_adapter("merged")
        m.eval()
    with torch.no_grad():
        assert_close(out(i, ids()), out(r, ids()), atol=1e-5, rtol=1e-5)
    i.save_pretrained(str(tmp_path), selected_adapters=["merged"])
    loaded = ref.PeftModel.from_pretrained(llama(), str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert_close(out(loaded, ids()), out(i, ids()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ctype", ["cat", "linear", "svd"])
def test_add_weighted_adapter_over_bf16_embeddings_gives_peft_dtypes(ctype):
    """Sources kept in bf16 (autocast_adapter_dtype=False): "cat" and the factor types keep bf16 factors, the SVD
    types make float32 ones, as in PEFT (the embedding's factors are parameters, not modules, so they are replaced)."""
    base = llama().to(torch.bfloat16)
    models = []
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**cfg()), autocast_adapter_dtype=False)
            torch.manual_seed(3)
            m.add_adapter("b", lib.LoraConfig(**cfg()), autocast_adapter_dtype=False)
        models.append(m)
    r, i = models
    copy_weights(r, i)
    for m in (r, i):
        m.add_weighted_adapter(["default", "b"], [0.6, -0.9], "merged", combination_type=ctype)
    want, got = dict(r.named_parameters()), dict(i.named_parameters())
    merged = [n for n in want if ".merged" in n]
    assert any("lora_embedding_A.merged" in n for n in merged)
    for n in merged:
        assert got[n].dtype == want[n].dtype and not got[n].requires_grad, n
    wd, gd = merged_deltas(r), merged_deltas(i)
    for n in wd:  # "svd": PEFT's SVD reads the bf16-rounded delta (about 0.4% off), this one the factors
        assert_close(gd[n].float(), wd[n].float(), atol=3e-2 if ctype == "svd" else 1e-2, rtol=1e-2, msg=n)
