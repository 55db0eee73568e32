"""OFT against PEFT 0.21.2 on linear models and embeddings (tiny Llama, GPT-2's lm_head, an MLP): parameters and
init, forward and gradients, files both ways, merging, several adapters, refusals. Convolutions:
test_parity_oft_conv.py; 4-bit bases: test_parity_oft_adalora_4bit.py; how peft_fast computes it:
test_oft_compute.py."""
import warnings

import pytest
import torch
from lycoris_pairs import assert_eval_matches, assert_same_files, assert_train_step_matches
from oft_adalora_pairs import OFTConfig, add_both, build, cfg, pair, x_for
from tiny_models import assert_close, assert_same_params, assert_same_state, assert_unchanged, base_model, \
    copy_weights, impl, out, peft_fast_only, raises_like_peft, ref, set_active, snapshot

CASES = [
    ("llama", {}),
    ("llama", {"init_weights": True}),
    ("llama", {"r": 4, "oft_block_size": 0}),
    ("llama", {"oft_block_size": 12}),  # adjusted per layer to a divisor of in_features, with PEFT's warning
    ("llama", {"use_cayley_neumann": False}),
    ("llama", {"num_cayley_neumann_terms": 3}),
    ("llama", {"num_cayley_neumann_terms": 2, "block_share": True}),
    ("llama", {"coft": True, "eps": 1e-3, "oft_block_size": 16}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["o_proj"]}),
    ("llama", {"target_modules": None}),  # PEFT's default targets for llama
    ("llama", {"layers_to_transform": [1], "layers_pattern": "layers", "bias": "oft_only"}),
    ("llama", {"modules_to_save": ["lm_head"]}),
    ("llama", {"target_modules": ["embed_tokens", "q_proj", "v_proj"]}),  # oft.Embedding rotates the looked-up rows
    ("llama", {"target_modules": ["embed_tokens"], "block_share": True, "oft_block_size": 16}),
    ("gpt2", {}),  # GPT-2's dropouts run too: the RNG is consumed in PEFT's order
    ("mlp", {"bias": "all", "oft_block_size": 4}),
]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'default'}" for k, kw in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameters_and_init_match_peft(case):
    """Same trainable names, shapes and count, and, under one seed, the same initial values (PEFT's init is
    deterministic: zeros, or one normal draw per layer in a fixed order)."""
    kind, kw = case
    _, r, i = build("oft", kind, **kw)
    assert_same_params(r, i)
    assert i.get_nb_trainable_parameters() == r.get_nb_trainable_parameters()
    assert_same_state(r, i, atol=0, rtol=0)
    assert [s.module_type for s in i.get_layer_status()] == [s.module_type for s in r.get_layer_status()]
    same = {"peft_version": None, "auto_mapping": None}  # PEFT's own bookkeeping: the files test them
    assert i.peft_config["default"].to_dict() | same == r.peft_config["default"].to_dict() | same


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_gradients_match_peft(case):
    """Three seeded training steps (the same loss and gradients, COFT's in-place projection included), then eval."""
    kind, kw = case
    _, r, i = pair("oft", kind, **kw)
    x = x_for(kind)
    assert_train_step_matches(kind, r, i, x, steps=3)
    assert_same_state(r, i)
    assert_eval_matches(kind, r, i, x)
    with torch.no_grad():  # the eval cache in use: a second call gives the same
        assert_close(out(i, x), out(r, x))


def test_module_dropout_has_no_effect_as_in_peft():
    """PEFT 0.21.2 builds OFT's multiplicative dropout and never applies it: train-mode outputs do not depend on
    the seed, and equal peft_fast's."""
    _, r, i = pair("oft", "llama", module_dropout=0.5)
    x = x_for("llama")
    r.train()
    with torch.no_grad():
        torch.manual_seed(1)
        first = out(r, x)
        torch.manual_seed(2)
        assert torch.equal(out(r, x), first)
    assert_train_step_matches("llama", r, i, x, steps=2)


@peft_fast_only
def test_module_dropout_warns_that_it_does_nothing():
    with pytest.warns(UserWarning, match="module_dropout has no effect"):
        config = OFTConfig(**cfg("oft", "llama", module_dropout=0.5))
    assert config.module_dropout == 0.5


def test_files_both_ways(tmp_path):
    """Two adapters saved by each library: the same files (tensors, adapter_config.json, metadata); each library
    loads the other's with equal outputs."""
    _, r, i = pair("oft", "llama")
    add_both("oft", r, i, "second", "llama", seed=2, coft=True, oft_block_size=16, use_cayley_neumann=False,
             target_modules=["embed_tokens", "q_proj", "down_proj"])
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert_same_files(tmp_path / "impl", tmp_path / "ref")
    assert_same_files(tmp_path / "impl" / "second", tmp_path / "ref" / "second")
    x = x_for("llama")
    r.eval()
    with torch.no_grad():
        want = {"default": out(r, x)}
        r.set_adapter("second")
        want["second"] = out(r, x)
    for src in ("ref", "impl"):
        for lib in (impl, ref):
            with warnings.catch_warnings():
                # PEFT's OFTConfig parses peft_version (to warn about pre-0.18 Cayley-Neumann files): neither a
                # failure nor that warning for peft_fast's files
                warnings.filterwarnings("error", message=".*cayley-neumann.*")
                loaded = lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / src))
            loaded.load_adapter(str(tmp_path / src / "second"), adapter_name="second")
            assert not loaded.training and type(loaded.peft_config["second"]).__name__ == "OFTConfig"
            with torch.no_grad():
                assert_close(out(loaded, x), want["default"], msg=f"{src} -> {lib.__name__}")
                loaded.set_adapter("second")
                assert_close(out(loaded, x), want["second"], msg=f"{src} -> {lib.__name__}")


@pytest.mark.parametrize("version,warns", [("0.13.2", True), (None, True), ("0.18.0", False), ("0.21.2@abc", False)])
def test_a_cayley_neumann_file_from_before_peft_0_18_warns_as_peft(version, warns, tmp_path):
    """PEFT 0.18 changed the Cayley-Neumann series: older files load with a warning that their outputs changed
    (no peft_version: older than 0.18, which added it)."""
    import json

    _, r, _ = pair("oft", "llama")
    r.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    assert data["use_cayley_neumann"] is True
    data.pop("peft_version")
    if version is not None:
        data["peft_version"] = version
    path.write_text(json.dumps(data))
    for lib in (ref, impl):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path))
        assert any("cayley-neumann" in str(w.message) for w in seen) is warns, lib.__name__


def test_an_oft_file_without_oft_block_size_is_refused_as_in_peft(tmp_path):
    import json

    _, r, _ = pair("oft", "llama")
    r.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["oft_block_size"]
    path.write_text(json.dumps(data))
    for lib in (ref, impl):
        with pytest.raises(ValueError, match="OFT has been updated since PEFT 0.14.0"):
            lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path))


def test_file_checks_stay_with_files():
    """PEFT checks a saved OFT config's version and fields when reading the file only: a dict without
    oft_block_size or peft_version (get_peft_config, a round trip through to_dict) takes the defaults silently."""
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config = lib.get_peft_config({"peft_type": "OFT", "target_modules": ["q_proj"],
                                          "use_cayley_neumann": True})
            again = lib.get_peft_config(config.to_dict())
        assert config.oft_block_size == again.oft_block_size == 32, lib.__name__


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_files_with_embedding_tables(kind, tmp_path):
    """A config naming lm_head or embed_tokens in target_modules: PEFT saves the adapted layer's base table with the
    adapter (save_embedding_layers="auto"), and loads it back into the base model; so does peft_fast."""
    targets = ["lm_head"] if kind == "gpt2" else ["embed_tokens", "lm_head", "q_proj"]
    _, r, i = pair("oft", kind, target_modules=targets)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert_same_files(tmp_path / "impl", tmp_path / "ref")
    x = x_for(kind)
    r.eval()
    for src in ("ref", "impl"):
        for lib in (impl, ref):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = lib.PeftModel.from_pretrained(base_model(kind), str(tmp_path / src))
            with torch.no_grad():
                assert_close(out(loaded, x), out(r, x), msg=f"{src} -> {lib.__name__}")


def test_peft_files_load_into_a_new_adapter(tmp_path):
    _, r, _ = pair("oft", "llama")
    r.save_pretrained(tmp_path)
    config = impl.PeftConfig.from_pretrained(str(tmp_path))
    loaded = impl.get_peft_model(base_model("llama"), config)
    impl.set_peft_model_state_dict(loaded, impl.load_peft_weights(str(tmp_path)))
    assert_eval_matches("llama", r, loaded, x_for("llama"))


def test_merge_unmerge_and_unload():
    """merge_adapter / unmerge_adapter (PEFT's blocks inverse) / safe merges / merge_and_unload of a chosen adapter
    / unload: PEFT's base weights after each, and outputs. Blocks near the identity (trained ones are): far from
    it the Neumann series is far from orthogonal and ill-conditioned, and both libraries' unmerges drift."""
    _, r, i = pair("oft", "llama", init_weights=True)
    add_both("oft", r, i, "other", "llama", seed=1, init_weights=True, oft_block_size=16,
             target_modules=["q_proj", "o_proj", "embed_tokens"])
    x = x_for("llama")
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
        for m in (r, i):  # two adapters merged in turn: PEFT's sequence of rotations, whatever the forward order
            m.merge_adapter(adapter_names=["default", "other"], safe_merge=True)
        assert_same_state(r, i)
        for m in (r, i):
            m.unmerge_adapter()
        merged_r = r.merge_and_unload(adapter_names=["other"], safe_merge=True)
        merged_i = i.merge_and_unload(adapter_names=["other"], safe_merge=True)
        assert_same_state(merged_r, merged_i)
        assert type(merged_i.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    _, r, i = pair("oft", "llama")
    assert_same_state(r.unload(), i.unload(), atol=0, rtol=0)


def test_several_adapters_set_disable_delete():
    """Two active adapters rotate in turn (PEFT's order); set_adapter, disable_adapter, delete_adapter as PEFT."""
    _, r, i = pair("oft", "llama")
    add_both("oft", r, i, "other", "llama", seed=3, target_modules=["q_proj", "k_proj"], oft_block_size=4)
    x = x_for("llama")
    for names in (["default", "other"], ["other", "default"], "other"):
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
        assert_close(out(i, x), base_model("llama")(**x).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (r, i):
            m.delete_adapter("other")
    assert i.active_adapters == r.active_adapters == ["default"]
    assert_same_state(r, i)
    assert_eval_matches("llama", r, i, x)


def test_mixed_batch_peft_ignores_it():
    """PEFT 0.21.2 drops `adapter_names` for OFT: every sample gets the active adapter (peft_fast differs on
    purpose: test_mixed_batch_rows_get_their_own_adapter)."""
    _, r, _ = pair("oft", "llama")
    r.add_adapter("b", ref.OFTConfig(**cfg("oft", "llama")))
    r.eval()
    x = x_for("llama")
    with torch.no_grad():
        assert torch.equal(out(r, x, adapter_names=["b", "__base__", "default"]), out(r, x))


@peft_fast_only
def test_mixed_batch_rows_get_their_own_adapter():
    _, r, i = pair("oft", "llama", target_modules=["embed_tokens", "q_proj", "v_proj"])
    add_both("oft", r, i, "b", "llama", seed=1, target_modules=["q_proj", "o_proj", "embed_tokens"], oft_block_size=16)
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        mixed = out(i, x, adapter_names=["b", "default", "__base__"])
        r.set_adapter("b")
        assert_close(mixed[:1], out(r, {"input_ids": x["input_ids"][:1]}))
        r.set_adapter("default")
        assert_close(mixed[1:2], out(r, {"input_ids": x["input_ids"][1:2]}))
        with r.disable_adapter():
            assert_close(mixed[2:], out(r, {"input_ids": x["input_ids"][2:]}))


def test_refusals_like_peft():
    """GPT-2's Conv1D, r with oft_block_size, a second adapter with bias: refused as PEFT refuses them."""
    gpt2 = cfg("oft", "gpt2", target_modules=["c_attn"])
    raises_like_peft(TypeError, ["is not supported", "Currently, only"],
                     lambda: impl.get_peft_model(base_model("gpt2"), OFTConfig(**gpt2)),
                     lambda: ref.get_peft_model(base_model("gpt2"), ref.OFTConfig(**gpt2)))
    raises_like_peft(ValueError, ["only specify either r"], lambda: OFTConfig(r=4, oft_block_size=8),
                     lambda: ref.OFTConfig(r=4, oft_block_size=8))
    raises_like_peft(ValueError, ["either `r` or `oft_block_size` must be non-zero"],
                     lambda: OFTConfig(r=0, oft_block_size=0), lambda: ref.OFTConfig(r=0, oft_block_size=0))
    _, r, i = pair("oft", "llama", bias="all")
    snap = snapshot(i)
    raises_like_peft(ValueError, ["supports only 1 adapter with bias"],
                     lambda: i.add_adapter("b", OFTConfig(**cfg("oft", "llama", bias="oft_only"))),
                     lambda: r.add_adapter("b", ref.OFTConfig(**cfg("oft", "llama", bias="oft_only"))))
    if impl is not ref:
        assert_unchanged(i, snap)


@peft_fast_only
def test_failures_leave_the_model_as_it_was(tmp_path):
    """A broken adapter refused by safe_merge, and a file whose shapes do not fit, change nothing."""
    _, _, i = pair("oft", "llama")
    i.save_pretrained(tmp_path)
    with torch.no_grad():
        i.base_model.model.model.layers[1].mlp.down_proj.oft_R["default"].weight[0, 0] = float("inf")
    snap = snapshot(i)
    with pytest.raises(ValueError, match="NaN"):
        i.merge_adapter(safe_merge=True)
    assert_unchanged(i, snap)
    other = impl.get_peft_model(base_model("llama"), OFTConfig(**cfg("oft", "llama", oft_block_size=16)))
    snap = snapshot(other)
    with pytest.raises(ValueError, match="do not fit"):
        other.load_adapter(str(tmp_path), adapter_name="default")  # blocks of 8 there, of 16 here
    assert_unchanged(other, snap)


def test_bf16_base():
    """A bf16 model: float32 blocks (autocast), the input rotated in float32 and rounded to bf16 as PEFT does."""
    base = base_model("llama").to(torch.bfloat16)
    _, r, i = build("oft", "llama", base=base)
    assert {p.dtype for n, p in i.named_parameters() if "oft_R" in n} == {torch.float32}
    x = x_for("llama")
    assert_train_step_matches("llama", r, i, x)
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        assert torch.equal(out(i, x), out(r, x))
        for m in (r, i):
            m.merge_adapter()
        assert_same_state(r, i, atol=1e-6, rtol=2**-7)  # float32 products rounded to bf16: within one bf16 ulp


def _loss_and_grads(model, x, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**x, labels=x["input_ids"]).loss
    loss.backward()  # outside autocast, as Trainer and Accelerate run it
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_training_under_autocast_with_more_tokens_than_features():
    """Trainer's bf16=True on a float32 model: a batch with more tokens than a layer's outputs takes the folded
    weight's route, whose backward receives bf16 gradients for float32 weights."""
    _, r, i = pair("oft", "llama")
    x = {"input_ids": torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(5))}
    results = []
    for m in (r, i):
        m.train()
        results.append(_loss_and_grads(m, x, autocast=True))
    (lr, gr), (li, gi) = results
    assert_close(li, lr, atol=1e-2, rtol=1e-2)
    for n, g in gr.items():
        assert gi[n].dtype == g.dtype == torch.float32
        assert_close(gi[n], g, atol=2e-2, rtol=5e-2, msg=n)


def test_training_after_a_forward_under_inference_mode(monkeypatch):
    """A validation pass under torch.inference_mode() (Lightning's default) before training: nothing it caches may
    be an inference tensor, which autograd refuses to save."""
    from peft_fast.tuners.oft import rotation

    monkeypatch.setattr(rotation, "_SKEW_INDEX", {})  # as in a fresh process: the first forward builds the cache
    _, r, i = pair("oft", "llama")
    x = x_for("llama")
    for m in (r, i):
        with torch.inference_mode():
            m(**x)
        m.train()
    (lr, gr), (li, gi) = _loss_and_grads(r, x), _loss_and_grads(i, x)
    assert_close(li, lr)
    for n, g in gr.items():
        assert_close(gi[n], g, msg=n)


@pytest.mark.parametrize("how", ["cast after", "bf16 base, no autocast"])
def test_exact_cayley_with_16_bit_blocks(how):
    """use_cayley_neumann=False solves in float32 (torch has no 16-bit inverse), as PEFT's solve does."""
    kw = dict(use_cayley_neumann=False)
    if how == "cast after":
        _, r, i = pair("oft", "llama", **kw)
        for m in (r, i):
            m.to(torch.bfloat16)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r, i = (lib.get_peft_model(base_model("llama").to(torch.bfloat16),
                                       lib.OFTConfig(**cfg("oft", "llama", **kw)), autocast_adapter_dtype=False)
                    for lib in (ref, impl))
        copy_weights(r, i)
    assert {p.dtype for n, p in i.named_parameters() if "oft_R" in n} == {torch.bfloat16}
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        assert torch.equal(out(i, x), out(r, x))
