"""peft_fast.patch(peft_model) / unpatch / patch_peft / patched_layers: Hugging Face PEFT's own models run on
peft_fast's kernels in place, with PEFT's outputs, gradients, classes, parameters and files."""
import copy
import json
import pickle
import warnings

import pytest
import torch
from peft.tuners.lora import layer as peft_lora
from safetensors.torch import load_file

import peft_fast
from switches import use_settings
from tiny_models import AGAINST_PEFT, assert_close, base_model, count_calls, default_cfg, inputs, out, ref

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's patching of PEFT models has no PEFT counterpart")


@pytest.fixture
def lora_calls(monkeypatch):
    """Calls of peft_fast's fused LoRA op (either implementation); spies set before the first forward plans."""
    import peft_fast.tuners.lora.variants as variants

    return count_calls(monkeypatch, variants, "lora_linear_reference", "lora_linear_triton")


def _peft_model(kind, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return ref.get_peft_model(base_model(kind), ref.LoraConfig(**default_cfg(kind, **cfg)))


def _lora_layers(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, peft_lora.LoraLayer))


def _fwd_bwd(model, x):
    model.zero_grad()
    torch.manual_seed(0)  # GPT-2's own dropouts draw in train mode
    y = out(model, x)
    y.pow(2).mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_run(a, b):
    (ya, ga), (yb, gb) = a, b
    assert_close(ya, yb)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert_close(ga[n], gb[n], msg=n)


@pytest.mark.parametrize("kind,cfg", [("llama", {}), ("gpt2", {}), ("mlp", {}), ("llama", {"use_dora": True}),
                                      ("gpt2", {"use_dora": True}), ("gpt2", {"lora_dropout": 0.1})],
                         ids=["llama", "gpt2", "mlp", "llama-dora", "gpt2-dora", "gpt2-dropout"])
def test_patch_gives_peft_outputs_and_gradients(kind, cfg, lora_calls):
    plain = _peft_model(kind, **{"lora_dropout": 0.0, **cfg})
    fast = copy.deepcopy(plain)
    assert peft_fast.patch(fast) is fast
    x = inputs(kind)
    _assert_same_run(_fwd_bwd(fast, x), _fwd_bwd(plain, x))
    if not cfg.get("use_dora"):
        assert lora_calls, "the patched model never ran peft_fast's LoRA op"
    fast.eval(), plain.eval()
    with torch.no_grad():
        assert_close(out(fast, x), out(plain, x))
    # Still PEFT to everything that looks: same classes (by isinstance), parameter names, trainable set.
    assert isinstance(fast, ref.PeftModel)
    assert sorted(peft_fast.patched_layers(fast)) == _lora_layers(plain)
    for name in peft_fast.patched_layers(fast):
        layer = fast.get_submodule(name)
        assert isinstance(layer, type(plain.get_submodule(name))) and type(layer).__name__.startswith("Fast")
    assert [(n, p.requires_grad) for n, p in fast.named_parameters()] == \
        [(n, p.requires_grad) for n, p in plain.named_parameters()]


def test_patched_model_saves_peft_files_and_unpatch_restores_peft(tmp_path):
    plain = _peft_model("llama")
    fast = peft_fast.patch(copy.deepcopy(plain))
    fast.save_pretrained(tmp_path / "fast")
    plain.save_pretrained(tmp_path / "plain")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fast", "plain"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fast", "plain")]
    for c in configs:  # PEFT writes its target_modules set in iteration order, which a deepcopy may change
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]

    assert peft_fast.unpatch(fast) is fast
    assert peft_fast.patched_layers(fast) == []
    for name in _lora_layers(plain):
        layer = fast.get_submodule(name)
        assert type(layer) is type(plain.get_submodule(name))
        assert not {"_plans", "_view", "_stack_cache", "_pf_variants"} & set(vars(layer))
    x = inputs("llama")
    with torch.no_grad():
        assert_close(out(fast.eval(), x), out(plain.eval(), x))


def test_peft_methods_keep_working_on_a_patched_model():
    plain = _peft_model("llama")
    fast = peft_fast.patch(copy.deepcopy(plain))
    for m in (plain, fast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(1)
            m.add_adapter("other", ref.LoraConfig(**default_cfg("llama")))
        m.eval()
    x = inputs("llama")
    with torch.no_grad():
        for step in ("default", "other", "disable", "merge", "unmerge"):
            for m in (plain, fast):
                if step in ("default", "other"):
                    m.set_adapter(step)
                elif step == "merge":
                    m.merge_adapter()
                elif step == "unmerge":
                    m.unmerge_adapter()
            if step == "disable":
                with plain.disable_adapter(), fast.disable_adapter():
                    assert_close(out(fast, x), out(plain, x), msg=step)
            else:
                assert_close(out(fast, x), out(plain, x), msg=step)
        merged_plain, merged_fast = plain.merge_and_unload(), fast.merge_and_unload()
        assert_close(out(merged_fast, x), out(merged_plain, x))
    assert not any(type(m).__name__.startswith("Fast") for m in merged_fast.modules())


def test_mixed_batch_on_a_patched_model():
    plain = _peft_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        plain.add_adapter("other", ref.LoraConfig(**default_cfg("llama")))
    fast = peft_fast.patch(copy.deepcopy(plain))
    x = inputs("llama", batch=4)
    names = ["default", "__base__", "other", "default"]
    with torch.no_grad():
        assert_close(out(fast.eval(), x, adapter_names=names), out(plain.eval(), x, adapter_names=names))


def _two_adapters_patched():
    """(a PEFT model with adapters default and other, in eval; a patched copy)."""
    plain = _peft_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        plain.add_adapter("other", ref.LoraConfig(**default_cfg("llama")))
    plain.eval()
    return plain, peft_fast.patch(copy.deepcopy(plain))


def _readd_other(model):
    model.delete_adapter("other")
    torch.manual_seed(7)
    model.add_adapter("other", ref.LoraConfig(**default_cfg("llama", r=2)))


def _scaled(method, *args):
    def change(model):
        for m in model.modules():
            if isinstance(m, peft_lora.LoraLayer):
                getattr(m, method)(*args)
    return change


@pytest.mark.parametrize("change", [_readd_other, _scaled("set_scale", "other", 3.0), _scaled("scale_layer", 0.5)],
                         ids=["delete-add", "set_scale", "scale_layer"])
def test_a_patched_model_s_mixed_batches_see_peft_s_own_adapter_changes(change):
    """PEFT's methods change adapters without telling anyone: a patched layer drops what it derived from them (the
    mixed-batch stacks, the deleted adapter's variant) when they run, with no eval() needed."""
    plain, fast = _two_adapters_patched()
    x = inputs("llama", batch=3)
    names = ["default", "other", "__base__"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out(fast, x, adapter_names=names)  # the stacks are built for the adapters as they were
        for model in (plain, fast):
            change(model)
        assert_close(out(fast, x, adapter_names=names), out(plain, x, adapter_names=names))


def test_a_patched_model_s_mixed_batches_follow_peft_s_rescale_adapter_scale():
    """PEFT's helper replaces the layers' scaling values directly (no method to hook): mixed batches inside the
    context and after it give PEFT's outputs."""
    from peft.helpers import rescale_adapter_scale

    plain, fast = _two_adapters_patched()
    x = inputs("llama", batch=3)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        out(fast, x, adapter_names=names)  # the slots are built at the original scale
        for model in (plain, fast):
            with rescale_adapter_scale(model, 0.5):
                got = out(model, x, adapter_names=names)
            if model is plain:
                want = got
        assert_close(got, want)
        assert_close(out(fast, x, adapter_names=names), out(plain, x, adapter_names=names))


def test_a_patched_model_s_alternating_mixes_do_not_reallocate_stacks(monkeypatch):
    """A patched model's slot table is each batch's names: batches alternating between many adapters and one keep
    the stacks the layer's adapters need, instead of shrinking and growing them every time."""
    from peft_fast.tuners.lora import stacks

    plain, fast = _two_adapters_patched()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(6):  # x0 with lora_bias: only some batches hold a biased adapter
            torch.manual_seed(10 + k)
            fast.add_adapter(f"x{k}", ref.LoraConfig(**default_cfg("llama", lora_bias=k == 0)))
    peft_fast.patch(fast)
    fast.eval()
    calls = []
    real = stacks.StackCache._allocate
    monkeypatch.setattr(stacks.StackCache, "_allocate", lambda self, *a: calls.append(1) or real(self, *a))
    many = ["default", "other", "x0", "x1", "x2", "x3", "x4", "x5"]
    with torch.no_grad():
        for _ in range(4):
            out(fast, inputs("llama", batch=8), adapter_names=many)
            out(fast, inputs("llama", batch=2), adapter_names=["x5", "__base__"])
    layers = sum(1 for m in fast.modules() if isinstance(m, peft_lora.LoraLayer))
    assert len(calls) <= 2 * layers  # built once (and grown once at most), never per batch


def test_a_patched_model_frees_deleted_dora_adapters():
    import gc
    import weakref

    fast = peft_fast.patch(_peft_model("llama"))
    x = inputs("llama", batch=2)
    gone = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(3):
            fast.add_adapter(f"t{k}", ref.LoraConfig(**default_cfg("llama", use_dora=True)))
            peft_fast.patch(fast)
            fast.set_adapter(f"t{k}")
            fast.eval()
            with torch.no_grad():
                out(fast, x)
            gone.append(weakref.ref(dict(fast.named_parameters())[
                f"base_model.model.model.layers.0.self_attn.q_proj.lora_A.t{k}.weight"]))
            fast.set_adapter("default")
            fast.delete_adapter(f"t{k}")
    gc.collect()
    assert all(ref_() is None for ref_ in gone)


def test_a_patched_model_keeps_batch_metadata_for_a_few_shapes_only():
    """PEFT's names reach the layers once per forward; a patched model keeps them (and the token metadata per
    activation shape) per thread while the mix stays the same: growing sequences must not grow that cache."""
    from peft_fast.tuners.lora import peft_layers

    plain = _peft_model("llama")
    fast = peft_fast.patch(plain).eval()
    with torch.no_grad():
        for seq in range(1, 21):
            out(fast, inputs("llama", batch=2, seq=seq), adapter_names=["default", "__base__"])
    assert 1 <= len(peft_layers._BATCH_NAMES.last[1]._meta) <= 8


def test_a_mixed_batch_list_edited_in_place_is_seen():
    """The adapter_names list is converted once per forward (every layer gets the same list): a list edited between
    forwards still routes every row to its own adapter. (Threads: PEFT's model routes adapter_names through forward
    hooks on shared layers, so concurrent mixed batches on a PEFT model, patched or not, can see each other's;
    peft_fast's own model does not, see test_mixed_batch.py.)"""
    plain, fast = _two_adapters_patched()
    x = inputs("llama", batch=4)
    batches = [["default", "other", "__base__", "other"], ["other", "__base__", "default", "default"]]
    with torch.no_grad():
        names = list(batches[0])
        assert_close(out(fast, x, adapter_names=names), out(plain, x, adapter_names=list(batches[0])))
        names[:] = batches[1]
        assert_close(out(fast, x, adapter_names=names), out(plain, x, adapter_names=list(batches[1])))


def test_triton_backend_on_a_patched_model(monkeypatch, lora_calls):
    use_settings(monkeypatch, backend="triton")
    import peft_fast.tuners.lora.variants as variants

    triton_calls = count_calls(monkeypatch, variants, "lora_linear_triton")
    plain = _peft_model("llama", lora_dropout=0.0)
    fast = peft_fast.patch(copy.deepcopy(plain))
    x = inputs("llama", batch=2, seq=3)
    _assert_same_run(_fwd_bwd(fast, x), _fwd_bwd(plain, x))
    assert triton_calls


def test_layers_peft_fast_cannot_run_stay_peft_and_warn_once():
    kw = default_cfg("llama", target_modules=["q_proj", "embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        plain = ref.get_peft_model(base_model("llama"), ref.LoraConfig(**kw))
    fast = copy.deepcopy(plain)
    with pytest.warns(UserWarning) as record:
        peft_fast.patch(fast)
    messages = [str(w.message) for w in record if "left" in str(w.message)]
    assert len(messages) == 1 and "embed_tokens" in messages[0] and "Embedding" in messages[0], messages
    assert peft_fast.patched_layers(fast) == [n for n in _lora_layers(plain) if "q_proj" in n]
    with torch.no_grad():
        assert_close(out(fast.eval(), inputs("llama")), out(plain.eval(), inputs("llama")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_fast.patch(fast)  # already done: patching again neither warns twice nor changes anything
    assert peft_fast.patched_layers(fast) == [n for n in _lora_layers(plain) if "q_proj" in n]


def test_layers_added_after_patching_are_peft_until_patched_again():
    fast = peft_fast.patch(_peft_model("llama"))
    before = peft_fast.patched_layers(fast)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast.add_adapter("mlp", ref.LoraConfig(**default_cfg("llama", target_modules=["up_proj"])))
    assert peft_fast.patched_layers(fast) == before
    peft_fast.patch(fast)
    assert len(peft_fast.patched_layers(fast)) == len(before) + 2


def test_patch_peft_block_patches_models_built_inside_only(tmp_path):
    init = ref.PeftModel.__init__
    _peft_model("llama").save_pretrained(tmp_path)
    with peft_fast.patch_peft():
        assert ref.PeftModel.__init__ is not init
        built = _peft_model("llama")
        loaded = ref.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert ref.PeftModel.__init__ is init
    after = _peft_model("llama")
    assert sorted(peft_fast.patched_layers(built)) == _lora_layers(built) and peft_fast.patched_layers(built)
    assert sorted(peft_fast.patched_layers(loaded)) == _lora_layers(loaded)
    assert peft_fast.patched_layers(after) == []
    with torch.no_grad():
        assert_close(out(loaded.eval(), inputs("llama")), out(after.eval(), inputs("llama")))


def test_patch_peft_block_restores_peft_when_it_raises():
    init = ref.PeftModel.__init__
    with pytest.raises(RuntimeError, match="inside"):
        with peft_fast.patch_peft():
            raise RuntimeError("inside")
    assert ref.PeftModel.__init__ is init


def test_a_patched_model_pickles_and_deep_copies():
    fast = peft_fast.patch(_peft_model("llama").eval())
    x = inputs("llama")
    with torch.no_grad():
        expected = out(fast, x)
        for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert peft_fast.patched_layers(clone) == peft_fast.patched_layers(fast)
            assert_close(out(clone, x), expected)


def test_patch_of_a_plain_model_without_config_says_what_to_pass():
    with pytest.raises(TypeError, match="config"):
        peft_fast.patch(base_model("mlp"))


def test_patch_of_a_peft_fast_model_is_refused_with_a_reason():
    model = peft_fast.get_peft_model(base_model("mlp"), peft_fast.LoraConfig(**default_cfg("mlp")))
    with pytest.raises(TypeError, match="already"):
        peft_fast.patch(model)


@pytest.mark.parametrize("cfg", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_a_patched_model_compiles_in_one_graph(cfg):
    """A training step of a patched PEFT model traces whole (fullgraph) and gives the eager PEFT model's loss and
    gradients."""
    model = _peft_model("llama", **cfg)
    eager = copy.deepcopy(model)
    peft_fast.patch(model)
    x = inputs("llama")
    torch._dynamo.reset()
    step = torch.compile(lambda m: _fwd_bwd(m, x), fullgraph=False, backend="aot_eager")
    explain = torch._dynamo.explain(lambda m: out(m, x).pow(2).mean())(model)
    assert explain.graph_break_count == 0, explain.break_reasons
    _assert_same_run(step(model), _fwd_bwd(eager, x))
