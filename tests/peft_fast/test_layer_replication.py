"""LoRA's `layer_replication` against PEFT 0.21.2 on a tiny Llama: the decoder's layers rebuilt from ranges, copies
sharing the base weights with adapters of their own. The same layers, draws, outputs, gradients, generation and
files in both libraries (either loads the other's); merging is refused (PEFT means to refuse it; its check never
fires); bad maps and failures leave the model as it was."""
import json
import warnings

import pytest
import torch

from tiny_models import assert_close, base_model, copy_weights, impl, inputs, out, peft_fast_only, ref

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
    tensors["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 64)  # no such layer
    save_file(tensors, str(path), metadata=metadata)
    base = base_model("llama")
    before = list(base.model.layers)
    with pytest.raises(ValueError, match="layers.5"):
        impl.PeftModel.from_pretrained(base, str(tmp_path))
    assert list(base.model.layers) == before and base.config.num_hidden_layers == 2
    model = impl.get_peft_model(base_model("llama"), impl.LoraConfig(**cfg(layer_replication=None)))
    with pytest.raises(ValueError, match="layers.5"):
        model.load_adapter(str(tmp_path), "loaded")
    assert len(layers(model)) == 2 and model.base_model.model.config.num_hidden_layers == 2
    assert list(model.peft_config) == ["default"]
