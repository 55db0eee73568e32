"""What PEFT calls as modules (lora_A, lora_B, lora_dropout, the DoRA magnitude, the base layer) is still called
as a module whenever that matters: hooks on it (accelerate's offload, DeepSpeed ZeRO-3, Opacus, activation
capture), torch's global hooks, a forward replaced on the instance, parametrized or pruned factors. The fused
ops read the weights instead, which is only right while none of these is there."""
import tempfile

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, prune

from tiny_models import assert_close, inputs, loss_of, make_dora_pair, make_pair, out, peft_fast_only

KINDS = ["plain", "dora"]


def _pair(kind, model="mlp", **kw):
    maker = make_dora_pair if kind == "dora" else make_pair
    return maker(model, **kw)


def _layer(model, name="lin0"):
    return getattr(model.base_model.model, name)


def _both(r, i, fn):
    """fn(model, layer) on both libraries' first adapted layer."""
    return fn(r, _layer(r)), fn(i, _layer(i))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("part", ["lora_A", "lora_B", "lora_dropout"])
def test_hooks_on_adapter_modules_fire_and_change_outputs_as_in_peft(kind, part):
    _, r, i = _pair(kind, lora_dropout=0.1 if part == "lora_dropout" else 0.0)
    x = inputs("mlp")
    seen = {}
    for model in (r, i):
        calls = seen[model] = []
        module = getattr(_layer(model), part)["default"]
        module.register_forward_pre_hook(lambda m, args, calls=calls: calls.append("pre"))
        module.register_forward_hook(lambda m, args, output, calls=calls: (calls.append("fwd"), output * 1.5)[1])
    for mode in ("train", "eval"):
        for model in (r, i):
            getattr(model, mode)()
            seen[model].clear()
        torch.manual_seed(0)
        want = out(r, x)
        torch.manual_seed(0)
        got = out(i, x)
        assert seen[i] == seen[r] and (seen[r] or part == "lora_dropout"), (mode, seen[r], seen[i])
        assert_close(got, want, msg=mode)


@pytest.mark.parametrize("kind", KINDS)
def test_base_layer_backward_hooks_and_global_hooks(kind):
    _, r, i = _pair(kind)
    x = inputs("mlp")["X"]
    grads = {}
    for model in (r, i):
        base = _layer(model).base_layer
        base.register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,))
        xi = x.clone().requires_grad_(True)
        model(X=xi).sum().backward()
        grads[model] = xi.grad
    assert_close(grads[i], grads[r])

    counts = {}
    for model in (r, i):
        linear_calls = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, args, output: linear_calls.append(1) if type(m) is nn.Linear else None)
        try:
            with torch.no_grad():
                model.eval()(X=x)
        finally:
            handle.remove()
        counts[model] = len(linear_calls)
    assert counts[i] == counts[r] > 3  # every factor and base Linear, as in PEFT


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["prune lora_A", "weight_norm lora_B", "spectral_norm lora_A", "instance forward"])
def test_parametrized_pruned_or_replaced_modules_train_as_in_peft(kind, how):
    _, r, i = _pair(kind)
    x = inputs("mlp")
    for model in (r, i):
        layer = _layer(model)
        torch.manual_seed(3)
        if how == "prune lora_A":
            prune.random_unstructured(layer.lora_A["default"], "weight", 0.5)
        elif how == "weight_norm lora_B":
            parametrizations.weight_norm(layer.lora_B["default"])
        elif how == "spectral_norm lora_A":
            parametrizations.spectral_norm(layer.lora_A["default"])
        else:  # as accelerate's add_hook_to_module does
            base, forward = layer.base_layer, layer.base_layer.forward
            base.forward = lambda *a, **k: forward(*a, **k) + 0.25
        model.train()
    for _ in range(2):
        losses = []
        for model in (r, i):
            torch.manual_seed(5)
            model.zero_grad()
            loss = loss_of(model, x)
            loss.backward()
            losses.append(loss)
        assert_close(losses[1], losses[0])
    want = {n: p.grad for n, p in r.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in i.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and want
    for n in want:
        assert_close(got[n], want[n], msg=n)
    with torch.no_grad():
        assert_close(out(i.eval(), x), out(r.eval(), x))


def test_mixed_batches_call_hooked_modules():
    _, r, i = make_pair("mlp", adapter_name="a")
    names = ["a", "__base__", "a"]
    x = inputs("mlp", batch=3)
    fired = {}
    for model in (r, i):
        model.eval()
        with torch.no_grad():
            model(**x, adapter_names=names)  # stacks built before the hook
        calls = fired[model] = []
        _layer(model).lora_B["a"].register_forward_hook(lambda m, a, o, calls=calls: (calls.append(1), -o)[1])
        model.train()
        model.eval()  # an event: the stacks see the hook (README, "Stacks")
    with torch.no_grad():
        assert_close(out(i, x, adapter_names=names), out(r, x, adapter_names=names))
    assert len(fired[i]) == len(fired[r]) == 1


def test_conv_factor_hooks():
    outs, fired = [], []
    for lib in ("ref", "impl"):
        import tiny_models

        mod = getattr(tiny_models, lib)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3))
        model = mod.get_peft_model(model, mod.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        calls = []
        model.base_model.model[0].lora_B["default"].register_forward_hook(
            lambda m, a, o, calls=calls: (calls.append(1), o * 3)[1])
        with torch.no_grad():
            outs.append(model(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))))
        fired.append(len(calls))
    assert fired == [1, 1]
    assert_close(outs[1], outs[0])


def test_accelerate_offloaded_models():
    """cpu_offload after creating the adapter (its weights then come in through hooks at each forward), and an
    adapter loaded onto a base dispatched with a layer on disk (device_map="auto" on a model that does not fit)."""
    accelerate = pytest.importorskip("accelerate")
    import tiny_models

    x = inputs("llama")
    _, r, i = make_pair("llama")
    with torch.no_grad():
        want = out(r.eval(), x)
        accelerate.cpu_offload(i, execution_device="cpu")
        assert _layer_of(i).lora_A["default"].weight.device.type == "meta"
        assert_close(out(i.eval(), x), want)

    _, r, _ = make_pair("llama")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        want = out(r.eval(), x)
        r.save_pretrained(f"{tmp}/adapter")
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                      "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        base = accelerate.dispatch_model(tiny_models.base_model("llama").eval(), device_map=device_map,
                                         main_device="cpu", offload_dir=f"{tmp}/offload")
        model = tiny_models.impl.PeftModel.from_pretrained(base, f"{tmp}/adapter")
        assert_close(out(model, x), want)


def _layer_of(model):
    return model.base_model.model.model.layers[1].self_attn.q_proj


def test_merging_into_offloaded_layers_as_in_peft():
    """cpu_offload after creating the adapter: merging brings each layer's weights in, merges, and writes the
    merged weight back to the offloaded copy (PEFT's onload_layer); unmerging and merge_and_unload too."""
    accelerate = pytest.importorskip("accelerate")

    x = inputs("llama")
    _, r, i = make_pair("llama")
    r.eval()
    with torch.no_grad():
        want = out(r, x)
        r.merge_adapter()
        want_merged = out(r, x)
        r.unmerge_adapter()
        accelerate.cpu_offload(i.eval(), execution_device="cpu")
        i.merge_adapter()
        assert _layer_of(i).base_layer.weight.device.type == "meta" and _layer_of(i).merged
        assert_close(out(i, x), want_merged)
        i.unmerge_adapter()
        assert_close(out(i, x), want)
        assert_close(out(i.merge_and_unload(), x), want_merged)


@peft_fast_only
@pytest.mark.parametrize("kw", [{"safe_merge": True}, {"safe_merge": True, "dequantize": True}, {"dequantize": True}],
                         ids=["safe", "safe-dequantize", "dequantize"])
def test_merge_and_unload_options_over_offloaded_layers(kw):
    """safe_merge's dry run brings the offloaded weights in too (also with dequantize=True, peft_fast's option)."""
    accelerate = pytest.importorskip("accelerate")

    x = inputs("llama")
    _, r, i = make_pair("llama")
    with torch.no_grad():
        r.eval().merge_adapter()
        want = out(r, x)
        accelerate.cpu_offload(i.eval(), execution_device="cpu")
        assert_close(out(i.merge_and_unload(**kw), x), want)


def _offloaded_dora_pair():
    """A DoRA adapter created over a base whose layers accelerate offloaded (the adapter itself is not), and its
    twin over the same base in memory."""
    accelerate = pytest.importorskip("accelerate")
    import tiny_models

    cfg = dict(target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    twin_base = tiny_models.base_model("llama")
    torch.manual_seed(0)
    twin = tiny_models.impl.get_peft_model(twin_base, tiny_models.impl.LoraConfig(**cfg))
    base = accelerate.cpu_offload(tiny_models.base_model("llama"), execution_device="cpu")
    torch.manual_seed(0)
    return twin, tiny_models.impl.get_peft_model(base, tiny_models.impl.LoraConfig(**cfg))


@peft_fast_only
def test_dora_over_offloaded_layers():
    """Beyond PEFT, whose DoRA reads the offloaded (meta) weight and fails: DoRA's norms bring the base weight in
    for its magnitude, forward, training, mixed batches and merges, and keep nothing of it afterwards (the
    offloaded layer stays off the device)."""
    twin, model = _offloaded_dora_pair()
    x = inputs("llama")
    assert _layer_of(model).base_layer.weight.device.type == "meta"
    adapters = dict(model.named_parameters())
    for n, a in twin.named_parameters():
        if "lora_" in n:  # the magnitudes: ||W + s·B·A|| of the offloaded W
            assert_close(adapters[n], a, msg=n)
    assert_close(loss_of(model, x), loss_of(twin, x))
    loss_of(model, x).backward()
    loss_of(twin, x).backward()
    for n, a in twin.named_parameters():
        if a.requires_grad:
            assert_close(adapters[n].grad, a.grad, msg=n)
    twin.eval(), model.eval()
    names = ["default", "__base__", "default"]
    with torch.no_grad():
        assert_close(out(model, x), out(twin, x))
        assert_close(out(model, x, adapter_names=names), out(twin, x, adapter_names=names))
        twin.merge_adapter(), model.merge_adapter()
        assert_close(out(model, x), out(twin, x))
        twin.unmerge_adapter(), model.unmerge_adapter()
        assert_close(out(model, x), out(twin, x))
    layer = _layer_of(model)
    assert layer.base_layer.weight.device.type == "meta"
    assert layer.base_view.norm_sq is None and all(v._eval is None for v in layer.lora_variant.values())


@peft_fast_only
def test_the_fused_op_comes_back_once_a_hook_is_removed():
    _, _, i = make_pair("mlp")
    i.eval()
    layer = _layer(i)
    handle = layer.lora_A["default"].register_forward_hook(lambda *a: None)
    with torch.no_grad():
        i(**inputs("mlp"))
    handle.remove()
    assert all(getattr(plan, "fused", None) is not None for plan in layer._plans.values())


def test_dora_on_a_model_built_on_meta_is_not_taken_for_offloaded():
    """Meta-device initialisation (then to_empty and a load), as with PEFT: not an offloaded model."""
    import tiny_models

    with torch.device("meta"):
        base = tiny_models._llama()  # (not base_model: its cache would keep a meta model for the next tests)
    model = tiny_models.impl.get_peft_model(base, tiny_models.impl.LoraConfig(target_modules=["q_proj"],
                                                                                use_dora=True))
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(p.device.type == "meta" for p in magnitudes)
    model.to_empty(device="cpu")


@peft_fast_only
def test_offload_seen_through_a_sequential_hook():
    """A hook appended to an offloaded layer turns its _hf_hook into a SequentialHook: still offloaded."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook, add_hook_to_module

    import tiny_models

    def offloaded_base():
        base = accelerate.cpu_offload(tiny_models.base_model("mlp"), execution_device="cpu")
        add_hook_to_module(base.lin0, ModelHook(), append=True)
        return base

    model = tiny_models.impl.get_peft_model(offloaded_base(), tiny_models.impl.LoraConfig(target_modules=["lin0"]))
    assert model.base_model.model.lin0.lora_A["default"].weight.device.type == "cpu"
    dora = tiny_models.impl.get_peft_model(offloaded_base(), tiny_models.impl.LoraConfig(target_modules=["lin0"],
                                                                                           use_dora=True))
    weight = tiny_models.base_model("mlp").lin0.weight  # DoRA's magnitude starts at ||W|| (B = 0): W came in
    assert_close(dora.base_model.model.lin0.lora_magnitude_vector["default"].weight, weight.norm(dim=1))
