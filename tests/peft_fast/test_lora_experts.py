"""LoRA on mixture-of-experts weights (LoraConfig.target_parameters) against PEFT's lora.ParamWrapper: tiny Mixtral,
Qwen3-MoE and gpt-oss, experts alone and experts with attention; parameters, outputs, gradients, files both ways,
merging, several adapters, and PEFT's refusals."""
import copy
import importlib
import os
import tempfile
import warnings

import pytest
import torch

import peft_fast
from moe_models import EXPERTS, moe_base, moe_cfg, moe_inputs, moe_pair
from switches import use_settings
from tiny_models import assert_close, assert_same_params, count_calls, impl, peft_fast_only, raises_like_peft, ref

KINDS = ["mixtral", "qwen3_moe", "gpt_oss"]
TARGETS = ["experts", "experts+attention"]
TOL = dict(atol=1e-10, rtol=1e-10)


def _logits(model, x):
    return model(**x).logits


def _grads(model, x):
    model.zero_grad()
    out = model(**x, labels=x["input_ids"])
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("targets", TARGETS)
def test_parameters_and_init_like_peft(kind, targets):
    """Same names, shapes, trainability; PEFT's default init (A kaiming over [r·E, in], B zero) under one seed."""
    _, ref_model, impl_model = moe_pair(kind, targets, init_lora_weights=True)
    assert_same_params(ref_model, impl_model)
    rs, is_ = ref_model.state_dict(), impl_model.state_dict()
    lora = [k for k in rs if "lora_" in k]
    assert any("experts.base_layer.lora_A" in k for k in lora) and any("experts.lora_B" in k for k in lora)
    assert any("q_proj" in k for k in lora) == (targets == "experts+attention")
    for k in lora:
        assert torch.equal(is_[k], rs[k]), k
    assert impl_model.get_nb_trainable_parameters() == ref_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("targets", TARGETS)
def test_outputs_and_gradients_like_peft(kind, targets):
    base, ref_model, impl_model = moe_pair(kind, targets)
    x = moe_inputs()
    r_out, r_grads = _grads(ref_model, x)
    i_out, i_grads = _grads(impl_model, x)
    assert (r_out - _logits(base, x)).abs().max() > 1e-3  # the adapters do something
    assert_close(i_out, r_out, **TOL)
    assert set(i_grads) == set(r_grads)
    for n in r_grads:
        assert_close(i_grads[n], r_grads[n], **TOL, msg=n)
    with ref_model.disable_adapter(), impl_model.disable_adapter():
        assert_close(_logits(impl_model, x), _logits(base, x), **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_files_both_ways(kind):
    base, ref_model, impl_model = moe_pair(kind, "experts+attention")
    x = moe_inputs()
    want = _logits(ref_model, x)
    with tempfile.TemporaryDirectory() as d_ref, tempfile.TemporaryDirectory() as d_impl:
        ref_model.save_pretrained(d_ref)
        impl_model.save_pretrained(d_impl)
        from safetensors.torch import load_file
        r_file = load_file(os.path.join(d_ref, "adapter_model.safetensors"))
        i_file = load_file(os.path.join(d_impl, "adapter_model.safetensors"))
        assert set(r_file) == set(i_file)
        for k in r_file:
            assert torch.equal(r_file[k], i_file[k]), k
        loaded_impl = impl.PeftModel.from_pretrained(copy.deepcopy(base), d_ref)
        loaded_ref = ref.PeftModel.from_pretrained(copy.deepcopy(base), d_impl)
    assert_close(_logits(loaded_impl, x), want, **TOL)
    assert_close(_logits(loaded_ref, x), want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_and_unload(kind):
    base, ref_model, impl_model = moe_pair(kind, "experts+attention")
    x = moe_inputs()
    want = _logits(ref_model, x)
    impl_model.merge_adapter()
    assert_close(_logits(impl_model, x), want, **TOL)
    impl_model.unmerge_adapter()
    assert_close(_logits(impl_model, x), want, **TOL)
    experts = impl_model.base_model.model.model.layers[0].mlp.experts
    assert_close(experts.base_layer.base_layer.gate_up_proj, base.model.layers[0].mlp.experts.gate_up_proj, **TOL)
    merged_ref = ref_model.merge_and_unload()
    merged = impl_model.merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    assert set(merged.state_dict()) == set(base.state_dict())  # no wrapper left behind, nested or not
    mine, theirs = dict(merged.named_parameters()), dict(merged_ref.named_parameters())
    assert set(mine) == set(theirs)
    for n, q in theirs.items():
        assert_close(mine[n], q, **TOL, msg=n)
    assert_close(_logits(merged, x), want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_several_adapters(kind):
    _, ref_model, impl_model = moe_pair(kind)
    kw = moe_cfg(r=2, lora_alpha=5)
    for model, lib in ((ref_model, ref), (impl_model, impl)):
        torch.manual_seed(3)
        model.add_adapter("other", lib.LoraConfig(**kw))
    x = moe_inputs()
    for name in ("other", "default"):
        ref_model.set_adapter(name)
        impl_model.set_adapter(name)
        assert_close(_logits(impl_model, x), _logits(ref_model, x), **TOL, msg=name)
    ref_model.base_model.set_adapter(["default", "other"])
    impl_model.base_model.set_adapter(["default", "other"])
    assert_close(_logits(impl_model, x), _logits(ref_model, x), **TOL, msg="both")
    ref_model.delete_adapter("other")
    impl_model.delete_adapter("other")
    assert_close(_logits(impl_model, x), _logits(ref_model, x), **TOL, msg="after delete")
    assert set(impl_model.state_dict()) == set(ref_model.state_dict())
    bad = moe_cfg(target_parameters=["experts.down_proj"])
    raises_like_peft(ValueError, ["same set of parameters"],
                     lambda: impl_model.add_adapter("x", impl.LoraConfig(**bad)),
                     lambda: ref_model.add_adapter("x", ref.LoraConfig(**bad)))


def test_a_2d_parameter_target_runs_the_module_with_the_adapted_weight():
    """Qwen3-MoE's dense layer: its Linear weight as a parameter target (PEFT: one expert)."""
    kw = dict(target_parameters=["layers.1.mlp.down_proj.weight", *EXPERTS])
    base, ref_model, impl_model = moe_pair("qwen3_moe", **kw)
    x = moe_inputs()
    r_out, r_grads = _grads(ref_model, x)
    i_out, i_grads = _grads(impl_model, x)
    assert_close(i_out, r_out, **TOL)
    for n in r_grads:
        assert_close(i_grads[n], r_grads[n], **TOL, msg=n)
    assert any("layers.1.mlp.down_proj.lora_A" in k for k in impl_model.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_float32_model_takes_the_grouped_path(kind, monkeypatch):
    """float32 on CPU: the experts' LoRA is torch's grouped matmul, not a loop over experts (PEFT's default experts
    implementation, grouped_mm, is the comparison)."""
    op = importlib.import_module("peft_fast.kernels.grouped_lora")
    loops = count_calls(monkeypatch, op, "grouped_lora_reference")
    base, ref_model, impl_model = moe_pair(kind, dtype=torch.float32)
    x = moe_inputs()
    r_out, r_grads = _grads(ref_model, x)
    i_out, i_grads = _grads(impl_model, x)
    assert_close(i_out, r_out, atol=1e-4, rtol=1e-4)
    for n in r_grads:
        assert_close(i_grads[n], r_grads[n], atol=1e-4, rtol=1e-4, msg=n)
    assert not loops


@peft_fast_only
@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernels_under_the_interpreter(kind, monkeypatch):
    """The GPU path (grouped shrink/expand and weight-gradient launches), run by the interpreter, equals PEFT."""
    from peft_fast.kernels import interpreting

    op = importlib.import_module("peft_fast.kernels.grouped_lora")
    if not interpreting():
        pytest.skip("needs the Triton interpreter (tests/conftest.py turns it on without a GPU)")
    base, ref_model, impl_model = moe_pair(kind)
    use_settings(monkeypatch, backend="triton")
    launches = count_calls(monkeypatch, op, "grouped_lora_triton")
    x = moe_inputs(batch=2, seq=5)
    r_out, r_grads = _grads(ref_model, x)
    i_out, i_grads = _grads(impl_model, x)
    assert_close(i_out, r_out, **TOL)
    for n in r_grads:
        assert_close(i_grads[n], r_grads[n], **TOL, msg=n)
    layers = sum(type(m).__name__.endswith("Experts") for m in base.modules())
    assert len(launches) == 2 * layers  # one grouped op per adapted projection, whatever the number of experts


@pytest.mark.parametrize("field, value, words", [
    ("lora_dropout", 0.1, ["lora_dropout"]), ("use_dora", True, ["dora"]), ("lora_bias", True, ["lora_bias"]),
])
def test_refusals_like_peft(field, value, words):
    kw = moe_cfg(**{field: value})
    raises_like_peft(ValueError, words, lambda: impl.get_peft_model(moe_base("mixtral"), impl.LoraConfig(**kw)),
                     lambda: ref.get_peft_model(moe_base("mixtral"), ref.LoraConfig(**kw)))


@peft_fast_only
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batches_beyond_peft(kind, backend, grad, monkeypatch):
    """PEFT refuses adapter_names on parameter targets; peft_fast serves them with the multi-adapter kernels, each
    (adapter, expert) pair a slot. Each sample must get what PEFT gives it alone with its adapter active."""
    from peft_fast.kernels import interpreting

    if backend == "triton":
        if not interpreting():
            pytest.skip("needs the Triton interpreter (tests/conftest.py turns it on without a GPU)")
        use_settings(monkeypatch, backend="triton")
    _, ref_model, impl_model = moe_pair(kind, "experts+attention")
    kw = moe_cfg("experts+attention", r=2, lora_alpha=5)
    for model, lib in ((ref_model, ref), (impl_model, impl)):
        torch.manual_seed(3)
        model.add_adapter("other", lib.LoraConfig(**kw))
        model.eval()
    x = moe_inputs(batch=4)
    names = ["other", "default", "__base__", "other"]
    with torch.set_grad_enabled(grad):  # no grad: the batched kernels; grad: each adapter's differentiable op
        got = _logits(impl_model, {**x, "adapter_names": names})
    _each_sample_as_alone(got, ref_model, x, names)


def _each_sample_as_alone(got, ref_model, x, names):
    for i, name in enumerate(names):
        one = {"input_ids": x["input_ids"][i:i + 1]}
        if name == "__base__":
            with ref_model.disable_adapter():
                want = _logits(ref_model, one)
        else:
            ref_model.set_adapter(name)
            want = _logits(ref_model, one)
        assert_close(got[i:i + 1], want, **TOL, msg=f"sample {i} ({name})")


@peft_fast_only
@pytest.mark.parametrize("edit", ["weight", "scaling"])
def test_mixed_batch_stacks_follow_an_adapter_edit(edit):
    """The experts' mixed-batch stacks are kept while the adapters' parameter versions and scalings stay: an
    in-place edit of one adapter's B, or of its scaling, in eval mode is served by the next batch."""
    _, ref_model, impl_model = moe_pair("mixtral", "experts")
    for model, lib in ((ref_model, ref), (impl_model, impl)):
        torch.manual_seed(3)
        model.add_adapter("other", lib.LoraConfig(**moe_cfg("experts", r=2, lora_alpha=5)))
        model.eval()
    x = moe_inputs(batch=4)
    names = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        _logits(impl_model, {**x, "adapter_names": names})  # the stacks are built
        ref_mods = dict(ref_model.named_modules())
        edited = 0
        for name, m in impl_model.named_modules():
            if hasattr(m, "_mixed_cache") and hasattr(m, "lora_B"):
                for layer in (m, ref_mods[name]):
                    if edit == "weight":
                        layer.lora_B["other"].weight.mul_(2.0)
                    else:
                        layer.scaling["other"] = layer.scaling["other"] * 3
                edited += 1
        assert edited
        got = _logits(impl_model, {**x, "adapter_names": names})
    _each_sample_as_alone(got, ref_model, x, names)


def test_bad_targets_refused_like_peft():
    with pytest.raises(TypeError, match="list of str"):
        impl.LoraConfig(target_parameters="experts.down_proj")
    nothing = moe_cfg(target_parameters=["experts.no_such_proj"])
    raises_like_peft(ValueError, ["no `target_parameters` found"],
                     lambda: impl.get_peft_model(moe_base("mixtral"), impl.LoraConfig(**nothing)),
                     lambda: ref.get_peft_model(moe_base("mixtral"), ref.LoraConfig(**nothing)))


@peft_fast_only
def test_failed_injection_leaves_the_model_as_it_was():
    model = moe_base("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = moe_cfg(target_modules=["q_proj"], target_parameters=["experts.down_proj", "q_proj.weight"])
    with pytest.raises(ValueError, match="not a valid target"):
        impl.get_peft_model(model, impl.LoraConfig(**kw))
    assert set(model.state_dict()) == set(before)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_add_weighted_adapter_refused_like_peft():
    _, ref_model, impl_model = moe_pair("mixtral")
    raises_like_peft(ValueError, ["add_weighted_adapter", "nn.Parameter"],
                     lambda: impl_model.add_weighted_adapter(["default"], [1.0], "mix", combination_type="linear"),
                     lambda: ref_model.add_weighted_adapter(["default"], [1.0], "mix", combination_type="linear"))


@peft_fast_only
def test_hotswap_refused_and_nothing_changes(tmp_path):
    _, ref_model, impl_model = moe_pair("mixtral")
    ref_model.save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in impl_model.state_dict().items()}
    with pytest.raises(ValueError, match="target_parameters wrapper"):
        impl.hotswap_adapter(impl_model, str(tmp_path), adapter_name="default")
    assert all(torch.equal(v, before[k]) for k, v in impl_model.state_dict().items())


@pytest.mark.parametrize("kind", KINDS)
def test_unload_and_disable_after_merge(kind):
    base, ref_model, impl_model = moe_pair(kind, "experts+attention")
    x = moe_inputs()
    for model in (ref_model, impl_model):
        model.merge_adapter()
    with ref_model.disable_adapter(), impl_model.disable_adapter():  # unmerges first, as every layer does
        assert_close(_logits(impl_model, x), _logits(ref_model, x), **TOL)
        assert_close(_logits(impl_model, x), _logits(base, x), **TOL)
    plain = impl_model.unload()
    assert set(plain.state_dict()) == set(base.state_dict())
    assert_close(_logits(plain, x), _logits(base, x), **TOL)


def test_experts_without_routing_run_their_module_as_peft_does():
    """Llama 4's experts module takes no routing arguments: its stacks are adapted through its own forward."""
    base, ref_model, impl_model = moe_pair("llama4", target_parameters=["feed_forward.experts.gate_up_proj",
                                                                        "feed_forward.experts.down_proj"])
    x = moe_inputs()
    r_out, r_grads = _grads(ref_model, x)
    i_out, i_grads = _grads(impl_model, x)
    assert (r_out - _logits(base, x)).abs().max() > 1e-3
    assert_close(i_out, r_out, **TOL)
    for n in r_grads:
        assert_close(i_grads[n], r_grads[n], **TOL, msg=n)


@peft_fast_only
def test_compiled_forward_and_backward_equal_eager():
    """torch.compile of a training step over experts LoRA on the CPU path (float32: torch's grouped matmul, one custom
    op under compile, as its own fake implementation takes bf16 only) is one graph with eager's gradients."""
    import torch._dynamo

    _, _, model = moe_pair("mixtral", "experts+attention", dtype=torch.float32)
    x = moe_inputs()
    _, want = _grads(model, x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(x["input_ids"])
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch._dynamo.reset()
    step = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, backend="aot_eager")
    model.zero_grad()
    step(x["input_ids"]).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, want[n], atol=1e-5, rtol=1e-5, msg=n)


@peft_fast_only
def test_packed_4bit_weights_are_not_parameter_targets():
    model = peft_fast.quantize(moe_base("mixtral", torch.float32))
    with pytest.raises(ValueError, match="target the module with target_modules"):
        impl.get_peft_model(model, impl.LoraConfig(target_modules=[], target_parameters=["q_proj.weight"]))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "NF4Linear"


@peft_fast_only
def test_compiled_triton_path_has_no_graph_break(monkeypatch):
    """The GPU path under torch.compile: the grouped LoRA is one custom op forward and backward, so a training
    step over experts LoRA is one graph (run here by the Triton interpreter), with eager's loss and gradients."""
    import torch._dynamo

    from peft_fast.kernels import interpreting

    if not interpreting():
        pytest.skip("needs the Triton interpreter (tests/conftest.py turns it on without a GPU)")
    use_settings(monkeypatch, backend="triton")
    _, _, model = moe_pair("mixtral", dtype=torch.float32)
    x = moe_inputs(batch=2, seq=5)

    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    _, want = _grads(model, x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x["input_ids"])
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch._dynamo.reset()
    model.zero_grad()
    loss = torch.compile(step, backend="aot_eager")(x["input_ids"])
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, want[n], atol=1e-6, rtol=1e-6, msg=n)


@peft_fast_only
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_patch_runs_peft_moe_models_on_the_grouped_kernels(kind, monkeypatch):
    """peft_fast.patch(peft_model): PEFT's own ParamWrappers run the grouped experts forward in place, with PEFT's
    outputs and gradients; unpatch gives PEFT's classes back."""
    op = importlib.import_module("peft_fast.kernels.grouped_lora")
    _, ref_model, _ = moe_pair(kind, "experts+attention")
    x = moe_inputs()
    want_out, want = _grads(ref_model, x)
    patched = peft_fast.patch(copy.deepcopy(ref_model))
    wrappers = [n for n in peft_fast.patched_layers(patched) if n.endswith("experts")
                or n.endswith("experts.base_layer")]
    layers = sum(type(m).__name__.endswith("Experts") and "ParamWrapper" not in type(m).__name__
                 for m in patched.modules())
    assert len(wrappers) == 2 * layers
    calls = count_calls(monkeypatch, op, "grouped_lora_reference")
    got_out, got = _grads(patched, x)
    assert len(calls) == 2 * layers  # one grouped op per adapted projection (float64: the reference)
    assert_close(got_out, want_out, **TOL)
    for n in want:
        assert_close(got[n], want[n], **TOL, msg=n)
    peft_fast.unpatch(patched)
    assert not peft_fast.patched_layers(patched)
    assert type(patched.base_model.model.model.layers[0].mlp.experts).__name__ == "ParamWrapper"


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("names", ["mlp", "all-linear", "router"])
def test_mlp_names_in_target_modules_reach_the_experts_as_in_peft(kind, names, tmp_path):
    """PEFT converts every new adapter's config on a transformers-5 mixture-of-experts model: the MLP names of the
    v4 layout (w1/w2/w3, gate/up/down_proj, gate) and "all-linear" become the stacked experts' and the router's
    target_parameters, the fused gate/up pair with doubled rank and alpha. The same config here, then the files load
    both ways (a saved config that still named the MLP would be converted again when read, and fail)."""
    targets = {"mlp": ["q_proj", "v_proj", "w1", "w2", "w3"] if kind == "mixtral" else
               ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
               "all-linear": "all-linear", "router": ["q_proj", "gate"]}[names]
    base = moe_base(kind)
    models = {}
    for lib in (ref, impl):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[lib] = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=2, target_modules=copy.deepcopy(
                targets), init_lora_weights=False))
    r, i = models[ref], models[impl]
    assert_same_params(r, i)
    rc, ic = r.peft_config["default"], i.peft_config["default"]
    assert set(ic.target_modules) == set(rc.target_modules)
    assert sorted(ic.target_parameters) == sorted(rc.target_parameters) and rc.target_parameters
    assert (ic.rank_pattern, ic.alpha_pattern) == (rc.rank_pattern, rc.alpha_pattern)
    i.load_state_dict(r.state_dict())
    x = moe_inputs()
    r.eval()
    i.eval()
    with torch.no_grad():
        want = _logits(r, x)
        assert_close(_logits(i, x), want, **TOL)
    i.save_pretrained(tmp_path)
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
        with torch.no_grad():
            assert_close(_logits(loaded, x), want, **TOL, msg=lib.__name__)


def test_a_second_adapter_is_checked_after_its_conversion_as_in_peft():
    """Two adapters whose MLP names convert to different expert parameter sets cannot share the wrappers: refused as
    PEFT refuses them, before anything changes (checked on the unconverted names, it was accepted and its files did
    not reload)."""
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(moe_base("mixtral"), lib.LoraConfig(r=2, target_modules=["w1", "w3"]))
            with pytest.raises(ValueError, match="same set of parameters"):
                model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["w1", "w3", "w2"]))
        assert list(model.peft_config) == ["default"], lib.__name__
