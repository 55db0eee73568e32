"""LoRA's `layer_replication` against PEFT 0.21.2 on a tiny Llama: the decoder's layers rebuilt from ranges, copies
sharing the base weights with adapters of their own. The same layers, draws, outputs, gradients, generation and
files in both libraries (either loads the other's); merging is refused (PEFT means to refuse it; its check never
fires); bad maps and failures leave the model as it was."""
import json
import threading
import warnings

import pytest
import torch

from tiny_models import AGAINST_PEFT, assert_close, base_model, copy_weights, impl, inputs, out, peft_fast_only, ref

MAP = [[0, 2], [1, 2]]  # layers 0 1 1 of the two-layer Llama


def cfg(**kw) -> dict:
    return {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": False,
            "layer_replication": MAP, **kw}


def build(lib, **kw):
    base = base_model("llama")  # before seeding: the first build draws from its own seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return lib.get_peft_model(base, lib.LoraConfig(**cfg(**kw)))


def layers(model):
    return model.base_model.model.model.layers


def test_replicas_draws_outputs_and_gradients_match_peft():
    r, i = build(ref), build(impl)
    assert len(layers(i)) == len(layers(r)) == 3
    assert i.base_model.model.config.num_hidden_layers == 3
    rp, ip = dict(r.named_parameters()), dict(i.named_parameters())
    assert sorted(rp) == sorted(ip)
    for n in rp:  # the same draws, layer by layer, in the replicated order
        assert torch.equal(ip[n], rp[n]), n
    copies = layers(i)
    assert copies[1].self_attn.q_proj.base_layer.weight is copies[2].self_attn.q_proj.base_layer.weight
    assert not torch.equal(copies[1].self_attn.q_proj.lora_A["default"].weight,
                           copies[2].self_attn.q_proj.lora_A["default"].weight)  # adapters of their own
    assert [m.self_attn.layer_idx for m in copies] == [0, 1, 2]
    x = inputs("llama")
    for m in (r, i):
        m.train()
    losses = [m(**x, labels=x["input_ids"]).loss for m in (r, i)]
    assert_close(losses[1], losses[0])
    for loss in losses:
        loss.backward()
    for n, p in rp.items():
        if p.requires_grad:
            assert_close(ip[n].grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)
    for m in (r, i):
        m.eval()
    assert_close(out(i, x), out(r, x))
    ids = x["input_ids"][:1]
    with torch.no_grad():
        assert torch.equal(i.generate(input_ids=ids, max_new_tokens=5, do_sample=False),
                           r.generate(input_ids=ids, max_new_tokens=5, do_sample=False))


def test_files_load_both_ways(tmp_path):
    r, i = build(ref), build(impl)
    copy_weights(r, i)
    i.save_pretrained(str(tmp_path / "impl"))
    r.save_pretrained(str(tmp_path / "ref"))
    saved = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("impl", "ref")]
    assert saved[0]["layer_replication"] == saved[1]["layer_replication"] == MAP
    x = inputs("llama")
    with torch.no_grad():
        want = out(i.eval(), x)
        for lib, folder in ((ref, "impl"), (impl, "ref"), (impl, "impl")):
            loaded = lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / folder)).eval()
            assert len(layers(loaded)) == 3
            assert_close(out(loaded, x), want, msg=f"{lib.__name__} loading {folder}")


@peft_fast_only
def test_merging_replicated_layers_is_refused():
    """A replica's delta merged into the shared base weight would reach every copy of the layer. PEFT's check for
    this looks up "layer_replication" among its adapter names and never fires; here it does, before any change."""
    i = build(impl)
    x = inputs("llama")
    with torch.no_grad():
        before = out(i.eval(), x)
    for call in (lambda: i.merge_adapter(), lambda: i.merge_and_unload()):
        with pytest.raises(ValueError, match="replicated"):
            call()
        assert not any(m.merged for m in i.modules() if hasattr(m, "merged_adapters"))
    with torch.no_grad():
        assert torch.equal(out(i, x), before)
    plain = i.unload()  # unloading keeps the replicated layers, as in PEFT
    assert len(plain.model.layers) == 3


@peft_fast_only
@pytest.mark.parametrize("bad, words", [([[0, 3]], "0 <= start < end <= 2"), ([[1, 1]], "start < end"),
                                        ([[0, "2"]], "layer_replication must be")])
def test_bad_maps_and_failures_leave_the_model_unchanged(bad, words):
    base = base_model("llama")
    before = list(base.model.layers)
    with pytest.raises(ValueError, match=words):
        impl.get_peft_model(base, impl.LoraConfig(**cfg(layer_replication=bad)))
    assert list(base.model.layers) == before and base.config.num_hidden_layers == 2


@peft_fast_only
def test_a_failure_after_replicating_puts_the_layers_back():
    base = base_model("llama")
    before = list(base.model.layers)
    with pytest.raises(ValueError, match="not_a_module"):
        impl.get_peft_model(base, impl.LoraConfig(**cfg(target_modules=["not_a_module"])))
    assert list(base.model.layers) == before and base.config.num_hidden_layers == 2
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in base.modules())


def test_mixed_batch_beside_a_second_adapter_matches_peft():
    r, i = build(ref), build(impl)
    for lib, m in ((ref, r), (impl, i)):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.add_adapter("other", lib.LoraConfig(**cfg(layer_replication=None)))
    copy_weights(r, i)
    x = inputs("llama")
    names = ["default", "other", "__base__"]
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        assert_close(i(**x, adapter_names=names).logits, r(**x, adapter_names=names).logits)


@peft_fast_only
def test_a_file_that_does_not_fit_leaves_the_base_unreplicated(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    i = build(impl)
    i.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["base_model.model.model.layers.2.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 64)  # not adapted
    save_file(tensors, str(path), metadata=metadata)
    base = base_model("llama")
    before = list(base.model.layers)
    with pytest.raises(ValueError, match="layers.2.self_attn.k_proj"):
        impl.PeftModel.from_pretrained(base, str(tmp_path))
    assert list(base.model.layers) == before and base.config.num_hidden_layers == 2
    model = impl.get_peft_model(base_model("llama"), impl.LoraConfig(**cfg(layer_replication=None)))
    with pytest.raises(ValueError, match="layers.2.self_attn.k_proj"):
        model.load_adapter(str(tmp_path), "loaded")
    assert len(layers(model)) == 2 and model.base_model.model.config.num_hidden_layers == 2
    assert list(model.peft_config) == ["default"]


def _two_replicating(lib):
    """`default` replicates [[0, 2], [1, 2]] (3 layers), then `two` replicates those: [[0, 3], [2, 3]] (4 layers,
    layer 3 a copy of layer 2, sharing `default`'s factors there)."""
    m = build(lib)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.add_adapter("two", lib.LoraConfig(**cfg(layer_replication=[[0, 3], [2, 3]])))
    return m


def test_two_replicating_adapters_save_and_reload_as_peft(tmp_path):
    """The saved `default` holds factors for layers.3 (the second replication's copy of layer 2, sharing them);
    loading `default` alone makes 3 layers, so those keys have no layer: skipped with a warning (PEFT drops them
    silently). Loading both in order gives the saved model, in either library."""
    r, i = _two_replicating(ref), _two_replicating(impl)
    copy_weights(r, i)
    assert len(layers(i)) == len(layers(r)) == 4
    i.save_pretrained(str(tmp_path / "impl"))
    r.save_pretrained(str(tmp_path / "ref"))
    x = inputs("llama")
    want = {}
    with torch.no_grad():
        for name in ("default", "two"):
            i.set_adapter(name)
            want[name] = out(i.eval(), x)
    for lib, folder in ((impl, "impl"), (impl, "ref"), (ref, "impl")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / folder))
        if lib is impl and not AGAINST_PEFT:
            assert any("replicated layers this model does not have" in str(w.message) for w in caught)
        loaded.load_adapter(str(tmp_path / folder / "two"), "two")
        assert len(layers(loaded)) == 4
        with torch.no_grad():
            for name in ("default", "two"):
                loaded.set_adapter(name)
                assert_close(out(loaded.eval(), x), want[name], msg=f"{lib.__name__} {folder} {name}")


@peft_fast_only
def test_merging_stays_refused_after_the_replicating_adapter_is_gone():
    """The copies share base weights whatever adapters remain: asked of the model, not of the configs."""
    i = build(impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        i.add_adapter("other", impl.LoraConfig(**cfg(layer_replication=None)))
        i.delete_adapter("default")
    assert len(layers(i)) == 3
    with pytest.raises(ValueError, match="replicated"):
        i.merge_and_unload()
    plain = i.unload()
    again = impl.get_peft_model(plain, impl.LoraConfig(**cfg(layer_replication=None)))
    with pytest.raises(ValueError, match="replicated"):
        again.merge_adapter()


@peft_fast_only
def test_loading_a_replicating_adapter_waits_for_mixed_batches(tmp_path, monkeypatch):
    """load_adapter rebuilds the layer list holding the serving lock, as add_adapter does."""
    from peft_fast import batching
    from peft_fast.tuners.lora import model as lora_model

    build(impl).save_pretrained(str(tmp_path))
    seen = []
    original = lora_model.replicate_layers

    def spy(*args, **kwargs):
        seen.append((batching.SERVING._writer == threading.get_ident(), batching.PREPARE_LOCK._is_owned()))
        return original(*args, **kwargs)

    monkeypatch.setattr(lora_model, "replicate_layers", spy)
    model = impl.get_peft_model(base_model("llama"), impl.LoraConfig(**cfg(layer_replication=None)))
    model.load_adapter(str(tmp_path), "loaded")
    assert seen == [(True, True)] and len(layers(model)) == 3


@peft_fast_only
def test_a_combined_adapter_goes_into_the_layers_as_they_are():
    """PEFT's add_weighted_adapter re-runs the merged config's replication (adapters[0]'s map) on the replicated
    model, rewiring the other adapters' layers (its `default` outputs change); here nothing is replicated again."""
    i = build(impl)
    x = inputs("llama")
    with torch.no_grad():
        before = out(i.eval(), x)
    i.add_weighted_adapter(["default"], [0.5], "halved", combination_type="linear")
    assert len(layers(i)) == 3 and i.peft_config["halved"].layer_replication == MAP
    with torch.no_grad():
        assert torch.equal(out(i, x), before)


def test_a_map_that_copies_no_layer_merges_as_peft():
    """[[0, 2]] rebuilds the list without a second copy of any layer: nothing shares a base weight, and merging
    works, as in PEFT."""
    r, i = build(ref, layer_replication=[[0, 2]]), build(impl, layer_replication=[[0, 2]])
    copy_weights(r, i)
    x = inputs("llama")
    with torch.no_grad():
        assert_close(out(i.merge_and_unload().eval(), x), out(r.merge_and_unload().eval(), x), atol=1e-5, rtol=1e-5)


@peft_fast_only
@pytest.mark.parametrize("tuner", ["LoHaConfig", "IA3Config"])
def test_other_tuners_refuse_merging_into_replicated_layers(tuner):
    """LoRA's replication outlives its adapters (unload keeps the layers): a LoHa or IA3 adapter put on the same
    model merges into the shared weights no more than LoRA does (PEFT merges them, changing the outputs)."""
    plain = build(impl).unload()
    kw = {"feedforward_modules": ["down_proj"]} if tuner == "IA3Config" else {"init_weights": False}
    model = impl.get_peft_model(plain, getattr(impl, tuner)(target_modules=["q_proj", "down_proj"], **kw))
    with pytest.raises(ValueError, match="replicated"):
        model.merge_and_unload()
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


@peft_fast_only
def test_a_key_past_the_layers_that_is_no_copy_is_refused(tmp_path):
    """Only keys repeating a kept layer's tensor are taken for a later replication's copies; another key past the
    end (a broken file) is refused as any key without a layer, with the base left as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    build(impl).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    tensors[key.replace("layers.2", "layers.3")] = tensors[key] + 1  # not a copy of layer 2's
    save_file(tensors, str(path), metadata=metadata)
    base = base_model("llama")
    with pytest.raises(ValueError, match="layers.3"):
        impl.PeftModel.from_pretrained(base, str(tmp_path))
    assert len(base.model.layers) == 2


@peft_fast_only
def test_a_copy_s_own_merge_is_refused():
    """layer.merge() on one copy (no model-level call): its shared base weight would carry the delta into the
    other copy, which would still report itself unmerged."""
    i = build(impl)
    copy_layer = layers(i)[1].self_attn.q_proj
    before = copy_layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="replicated"):
        copy_layer.merge()
    assert not copy_layer.merged and torch.equal(copy_layer.base_layer.weight, before)
    layers(i)[0].self_attn.q_proj.merge()  # layer 0 is copied once: nothing shares its weights
    assert layers(i)[0].self_attn.q_proj.merged


def test_a_plain_adapter_saved_beside_a_later_replicating_one_reloads_as_peft(tmp_path):
    """`default` has no layer_replication; `rep`, added after it, replicates its layers, so the saved `default`
    holds factors for the copies too. Loading `default` (two layers) skips those keys, as PEFT does, and loading
    `rep` after it gives the saved model, in either library."""
    kw = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": False}
    base = base_model("llama")
    torch.manual_seed(0)
    model = impl.get_peft_model(base, impl.LoraConfig(**kw))
    model.add_adapter("rep", impl.LoraConfig(**kw, layer_replication=[[0, 2], [0, 2]]))
    x = inputs("llama")
    with torch.no_grad():
        want = out(model.eval(), x)  # `default` active, over the four layers
    model.save_pretrained(str(tmp_path))
    for lib in (impl, ref):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path))
        loaded.load_adapter(str(tmp_path / "rep"), "rep")
        assert len(layers(loaded)) == 4
        with torch.no_grad():
            assert_close(out(loaded.eval(), x), want, msg=lib.__name__)


@peft_fast_only
def test_a_replication_that_would_drop_adapted_layers_is_refused(tmp_path):
    """Loading an adapter with MAP onto a model MAP replicated already rebuilds the list from the copies and drops
    the last one, with `default`'s factors on it: PEFT does so silently (its outputs change); refused here, with the
    model unchanged."""
    model = build(impl)
    model.save_pretrained(str(tmp_path))
    x = inputs("llama")
    with torch.no_grad():
        want = out(model.eval(), x)
    before = list(layers(model))
    with pytest.raises(ValueError, match=r"leaves out layer\(s\) \[2\] .* carry adapters"):
        model.load_adapter(str(tmp_path), "again")
    assert list(layers(model)) == before and "again" not in model.peft_config
    assert model.base_model.model.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.equal(out(model.eval(), x), want)
