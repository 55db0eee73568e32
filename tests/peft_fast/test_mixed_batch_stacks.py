"""Mixed batches through the batched kernels (one shrink + one expand per layer over stacked adapters): results
equal PEFT's and per-sample runs, on the reference and the Triton path, and the cached stacks are never stale."""
import warnings

import pytest
import torch
from tiny_models import (AGAINST_PEFT, add_both, assert_close, base_model, default_cfg, inputs, make_pair, out,
                         perturb_magnitudes)

import peft_fast
from peft_fast import LoraLinear
from peft_fast.batching import AdapterNames
from switches import use_settings

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's batched mixed-adapter path")

ADAPTERS = {
    "llama": [
        ("a", {"r": 2, "lora_alpha": 4}),
        ("b", {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["k_proj", "o_proj", "up_proj"]}),
        ("c", {"r": 5, "lora_alpha": 3, "rank_pattern": {"q_proj": 3}}),
    ],
    "gpt2": [  # Conv1D layers (fan_in_fan_out), one adapter with lora_bias
        ("a", {"r": 2, "lora_alpha": 4}),
        ("b", {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["c_attn"]}),
        ("c", {"r": 5, "lora_alpha": 3, "lora_bias": True, "rank_pattern": {"c_fc": 3}}),
    ],
}
NAMES = ["b", "__base__", "a", "c", "b", "a"]


def _three(kind="llama"):
    (n0, kw0), *rest = ADAPTERS[kind]
    _, ref, impl = make_pair(kind, adapter_name=n0, **kw0)
    for k, (n, kw) in enumerate(rest):
        add_both(ref, impl, n, kind, seed=10 + k, **kw)
    ref.eval()
    impl.eval()
    return ref, impl


def _per_sample(model, x, names):
    """The oracle: every sample alone, with its adapter active (or adapters disabled for "__base__")."""
    rows = []
    for i, name in enumerate(names):
        xi = {k: v[i:i + 1] for k, v in x.items()}
        if name == "__base__":
            with model.disable_adapter():
                rows.append(out(model, xi))
        else:
            model.set_adapter(name)
            rows.append(out(model, xi))
    return torch.cat(rows)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_path_matches_peft_and_per_sample_runs(backend, kind, monkeypatch):
    use_settings(monkeypatch, backend=backend)
    ref, impl = _three(kind)
    x = inputs(kind, batch=len(NAMES), seq=4, seed=3)
    with torch.no_grad():
        got = out(impl, x, adapter_names=NAMES)
        assert_close(got, out(ref, x, adapter_names=NAMES))
        assert all(m._stack_cache is not None for m in _layers(impl))  # the batched path really ran
        assert_close(got, _per_sample(impl, x, NAMES))


def test_generate_uses_the_batched_path_and_matches_peft():
    ref, impl = _three()
    ids = inputs("llama", batch=4, seq=3, seed=5)["input_ids"]
    names = ["c", "__base__", "a", "b"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = impl.generate(input_ids=ids, adapter_names=names, **kw)
        want = ref.generate(input_ids=ids, adapter_names=names, **kw)
    assert torch.equal(got, want)


def test_stacks_are_reused_while_nothing_changes():
    _, impl = _three()
    x = inputs("llama", batch=len(NAMES), seq=4, seed=3)
    with torch.no_grad():
        out(impl, x, adapter_names=NAMES)
        first = [m._stack_cache.stacks for m in _layers(impl)]
        out(impl, x, adapter_names=NAMES)
    assert all(a is b for a, b in zip(first, [m._stack_cache.stacks for m in _layers(impl)]))


def _check(impl, names=NAMES):
    x = inputs("llama", batch=len(names), seq=4, seed=3)
    impl.eval()
    with torch.no_grad():
        assert_close(out(impl, x, adapter_names=names), _per_sample(impl, x, names))


def test_stacks_follow_a_training_step():
    _, impl = _three()
    _check(impl)
    impl.train()
    impl.set_adapter("b")
    opt = torch.optim.SGD([p for p in impl.parameters() if p.requires_grad], lr=1.0)
    impl(**inputs("llama", batch=2, seq=4, seed=9)).logits.pow(2).mean().backward()
    opt.step()
    _check(impl)


def test_stacks_follow_load_delete_add_and_merge(tmp_path):
    _, impl = _three()
    _check(impl)
    # load: overwrite adapter "a" with other weights
    torch.manual_seed(123)
    donor = peft_fast.get_peft_model(base_model("llama"), peft_fast.LoraConfig(**default_cfg("llama", r=2,
                                                                                           lora_alpha=4)))
    donor.save_pretrained(tmp_path / "a2")
    impl.load_adapter(str(tmp_path / "a2"), adapter_name="a")
    _check(impl)
    # delete, then add a new adapter of a new rank
    impl.delete_adapter("c")
    _check(impl, ["b", "a", "__base__", "a"])
    impl.add_adapter("d", peft_fast.LoraConfig(r=6, target_modules=["v_proj", "down_proj"], init_lora_weights=False))
    _check(impl, ["d", "a", "b", "d"])
    # merged adapters refuse mixed batches; after unmerging the stacks are still right
    impl.set_adapter("a")
    impl.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        with torch.no_grad():
            out(impl, inputs("llama", batch=2, seq=4), adapter_names=["a", "b"])
    impl.unmerge_adapter()
    _check(impl, ["d", "a", "b", "__base__"])


def test_stacks_follow_load_state_dict_in_eval_mode():
    """torch's load_state_dict writes the parameters in place without the layer's own events: its post hook drops
    the stacks, which eval mode otherwise reuses without looking at each parameter."""
    _, impl = _three()
    x = inputs("llama", batch=len(NAMES), seq=4, seed=3)
    with torch.no_grad():
        before = out(impl, x, adapter_names=NAMES)  # eval mode, stacks built
    state = {k: v + 0.5 if "lora_B" in k else v for k, v in impl.state_dict().items()}
    impl.load_state_dict(state)
    with torch.no_grad():
        mixed = out(impl, x, adapter_names=NAMES)  # no other event in between: only the hook can drop the stacks
    assert not torch.allclose(mixed, before)
    with torch.no_grad():
        assert_close(mixed, _per_sample(impl, x, NAMES))


def test_eval_mode_trusts_the_stacks_without_checking_every_parameter(monkeypatch):
    """Serving: after the first mixed batch, the stacks are reused without reading any parameter's version."""
    from peft_fast.tuners.lora import stacks

    _, impl = _three()
    x = inputs("llama", batch=len(NAMES), seq=4, seed=3)
    with torch.no_grad():
        out(impl, x, adapter_names=NAMES)
        checks = []
        real = stacks.StackCache.update
        monkeypatch.setattr(stacks.StackCache, "update", lambda self, *a: checks.append(1) or real(self, *a))
        out(impl, x, adapter_names=NAMES)
        assert checks == []
        layer = _layers(impl)[0]
        layer.train()  # a layer in training mode checks (an optimizer may have moved the weights)
        names = AdapterNames(["a", "b"], ("a", "b", "c"))
        for _ in range(2):  # the first call after train() builds the stacks, the second checks them
            layer.mixed_batch_forward(torch.randn(2, layer.in_features), adapter_names=names)
        assert checks


def test_events_write_only_the_slots_that_changed(monkeypatch):
    """Adapters keep their slot while they exist: adding, deleting, loading or training one adapter writes that
    adapter's slot in each layer, never the others' (only growing the capacity, by doubling, rewrites all)."""
    from peft_fast.tuners.lora import stacks

    _, impl = _three()
    writes = []
    real = stacks.write_slot
    monkeypatch.setattr(stacks, "write_slot", lambda st, i, layer, name: writes.append(name) or real(st, i, layer,
                                                                                                    name))
    layers = _layers(impl)
    x = inputs("llama", batch=4, seq=4, seed=3)

    def batch(names):  # in eval mode already: no eval() call, which rewrites every slot (the next test)
        writes.clear()
        with torch.no_grad():
            out(impl, inputs("llama", batch=len(names), seq=4, seed=3), adapter_names=names)
        return sorted(set(writes), key=str)

    cfg = dict(r=2, init_lora_weights=False)  # within every layer's rank room (a larger rank rewrites that layer)
    # the first mixed batch fills the slots (4 of them: the slots grow by doubling, base_model._slot_table)
    assert batch(["a", "b", "c", "__base__"]) == ["a", "b", "c"]
    assert batch(["c", "b", "a", "a"]) == []
    impl.add_adapter("d", peft_fast.LoraConfig(**cfg))  # the 4th slot
    assert batch(["d", "a", "b", "c"]) == ["d"]
    impl.add_adapter("e", peft_fast.LoraConfig(**cfg))  # 8 slots: the capacity doubles, everything is written
    assert batch(["e", "a", "d", "__base__"]) == ["a", "b", "c", "d", "e"]
    slot_of_c = impl.base_model._slots.index("c")
    impl.delete_adapter("c")
    assert batch(["e", "a", "d", "b"]) == [None]  # c's slots freed
    impl.add_adapter("f", peft_fast.LoraConfig(**cfg))
    assert batch(["f", "a", "e", "b"]) == ["f"] and impl.base_model._slots.index("f") == slot_of_c
    impl.train()
    impl.set_adapter("a")
    opt = torch.optim.SGD([p for p in impl.parameters() if p.requires_grad], lr=1.0)
    impl(**x).logits.pow(2).mean().backward()
    opt.step()
    impl.eval()  # a switch of modes rewrites every slot (hand edits through .data: the next test)
    assert {"a", "b", "d", "e", "f"} <= set(batch(["f", "a", "e", "b"]))
    assert all(len(m._stack_cache.slot_names) == 8 for m in layers)
    assert batch(["f", "a", "e", "b"]) == []
    impl.eval()  # a server's eval() per request keeps the mode: nothing is rewritten
    assert batch(["f", "a", "e", "b"]) == []
    _check(impl, ["f", "a", "e", "b"])
    impl.add_adapter("g", peft_fast.LoraConfig(**cfg))
    assert batch(["g", "a", "e", "b"]) == ["g"]


def test_stacks_shrink_once_most_of_their_room_is_unused():
    """Sixteen rank-16 adapters served, then deleted (the slots at the table's end: slots never move while their
    adapter exists, for batches other threads run): the next mixed batch reallocates the stacks to the adapters
    left (with room to grow back), instead of keeping the peak's memory; outputs stay right."""
    _, impl = _three()
    _check(impl)  # a, b, c take the first slots
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(16):
            impl.add_adapter(f"big{k}", peft_fast.LoraConfig(r=16, init_lora_weights=False))
    impl.eval()
    big = ["big0", "big15", "a", "__base__"]
    _check(impl, big)
    peak = {id(m): m._stack_cache.full.a.numel() for m in _layers(impl)}
    for k in range(16):
        impl.delete_adapter(f"big{k}")
    _check(impl)
    for m in _layers(impl):
        cache = m._stack_cache
        assert len(cache.slot_names) == 4 and cache.capacity <= 8  # 3 adapters: 4 slots
        assert cache.full.a.numel() * 3 <= peak[id(m)]


def test_a_layer_left_without_adapters_drops_its_stacks():
    _, impl = _three()
    impl.add_adapter("solo", peft_fast.LoraConfig(r=8, target_modules=["gate_proj"], init_lora_weights=False))
    impl.eval()
    _check(impl, ["solo", "a", "__base__", "b"])
    gates = [m for n, m in impl.named_modules() if n.endswith("gate_proj") and isinstance(m, LoraLinear)]
    assert gates and all(m._stack_cache is not None for m in gates)
    impl.delete_adapter("solo")
    assert all(m._stack_cache is None for m in gates)
    _check(impl)


# ---------------------------------------------------------------------- slots that change kind, and base weights
def _two_built(first: dict, second: dict):
    """Adapters "a" and "b" on the MLP, in eval mode, with their stacks built by one mixed batch."""
    _, ref, impl = make_pair("mlp", adapter_name="a", r=4, **first)
    add_both(ref, impl, "b", "mlp", seed=1, r=4, **second)
    for m in (ref, impl):
        m.eval()
    x = inputs("mlp", batch=4, seed=2)
    with torch.no_grad():
        out(impl, x, adapter_names=["a", "b", "__base__", "a"])
    return ref, impl, x


def _set_lora_biases(*models):
    with torch.no_grad():
        for m in models:
            for n, p in m.named_parameters():
                if ".lora_B." in n and n.endswith(".bias"):
                    p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape))


@pytest.mark.parametrize("old,new", [({}, {"use_dora": True}), ({}, {"lora_bias": True}),
                                     ({"use_dora": True}, {}), ({"lora_bias": True}, {})],
                         ids=["lora-then-dora", "lora-then-bias", "dora-then-lora", "bias-then-lora"])
def test_a_freed_slot_taken_by_another_kind_of_adapter(old, new):
    """"b" deleted, "c" of another kind added into its slot (no new capacity), "a" still of the old kind: the
    stacks gain the per-channel scale or bias stack "c" needs, or "c" does not inherit the one "b" left."""
    ref, impl, x = _two_built(old, old)
    for m in (ref, impl):
        m.delete_adapter("b")
    add_both(ref, impl, "c", "mlp", seed=2, r=4, **new)
    perturb_magnitudes(ref, impl)
    _set_lora_biases(ref, impl)
    for m in (ref, impl):
        m.eval()
    names = ["c", "a", "__base__", "c"]
    with torch.no_grad():
        assert_close(out(impl, x, adapter_names=names), _per_sample(ref, x, names), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("edit", ["in place", "new storage"])
def test_dora_slots_follow_a_base_weight_edit_at_the_next_eval(edit):
    """A DoRA slot's scale depends on the base weight: edited by hand (in place, or `weight.data = ...`) in eval
    mode, it is seen after the next eval() (README, "Stacks"), although no adapter parameter changed. The oracle is
    PEFT running each sample alone."""
    ref, impl, x = _two_built({"use_dora": True}, {})
    assert perturb_magnitudes(ref, impl) > 0
    for m in (ref, impl):
        m.eval()
    names = ["a", "b", "__base__", "a"]
    new = torch.randn_like(ref.base_model.model.lin0.base_layer.weight)
    with torch.no_grad():
        out(impl, x, adapter_names=names)
        for m in (ref, impl):
            w = m.base_model.model.lin0.base_layer.weight
            if edit == "in place":
                w.mul_(1.5)
            else:
                w.data = new.clone()
    for m in (ref, impl):
        m.eval()
    with torch.no_grad():
        assert_close(out(impl, x, adapter_names=names), _per_sample(ref, x, names), atol=2e-5, rtol=2e-5)


def test_stacks_follow_a_dtype_cast_of_the_model():
    """Stacks built in float32, then the model cast to float64: the slots are float64 too (a float32 stack would
    round the adapters), as PEFT's mixed batch in float64."""
    ref, impl, x = _two_built({}, {"lora_alpha": 3})
    names = ["a", "b", "__base__", "b"]
    for m in (ref, impl):
        m.double()
    x64 = {"X": x["X"].double()}
    with torch.no_grad():
        assert_close(out(impl, x64, adapter_names=names), out(ref, x64, adapter_names=names), atol=1e-12,
                     rtol=1e-12)


def test_a_model_run_inside_another_models_mixed_batch_runs_its_own_adapter():
    """The batch plan reaches only the layers of the model that started it: another peft_fast model called from
    inside that forward (here from a hook) runs its own active adapter."""
    _, _, outer = make_pair("mlp", adapter_name="a", r=2)
    outer.add_adapter("b", peft_fast.LoraConfig(**default_cfg("mlp", r=4)))
    torch.manual_seed(5)
    inner = peft_fast.get_peft_model(base_model("mlp"), peft_fast.LoraConfig(**default_cfg("mlp", r=3)))
    outer.eval(), inner.eval()
    x = inputs("mlp", batch=4, seed=2)
    with torch.no_grad():
        want = out(inner, x)
    seen = []
    hook = outer.base_model.model.lin1.register_forward_hook(lambda *a: seen.append(out(inner, x)))
    try:
        with torch.no_grad():
            out(outer, x, adapter_names=["a", "b", "__base__", "a"])
    finally:
        hook.remove()
    assert len(seen) == 1
    assert_close(seen[0], want)


def test_a_layer_left_without_adapters_by_a_delete_serves_its_base():
    """"b" alone adapts k_proj, o_proj and up_proj: once it is deleted those layers hold no adapter, and mixed
    batches of the others run them as their base (before: StopIteration in every later mixed batch)."""
    ref, impl = _three()
    _check(impl)  # stacks built with "b" in them
    for m in (ref, impl):
        m.delete_adapter("b")
    names = ["a", "__base__", "c", "a"]
    _check(impl, names)
    x = inputs("llama", batch=len(names), seq=4, seed=3)
    with torch.no_grad():
        assert_close(out(impl, x, adapter_names=names), out(ref, x, adapter_names=names))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("edit", ["in place", ".data in place", ".data =", "new Parameter"])
def test_hand_edits_of_adapter_weights_are_seen_after_the_next_eval(edit, dora):
    """README ("Stacks"): weights edited by hand in eval mode are seen after the next model.eval(), although the
    model was in eval mode already. A `.data` edit in place bumps no version counter: a switch of modes
    (train() then eval()) rewrites every slot rather than the ones whose parameters' signatures changed."""
    ref, impl, x = _two_built({"use_dora": dora}, {"use_dora": dora})
    names = ["a", "b", "__base__", "b"]
    for m in (ref, impl):
        layer = m.base_model.model.lin0
        with torch.no_grad():
            if edit == "in place":
                layer.lora_B["b"].weight.mul_(3)
            elif edit == ".data in place":
                layer.lora_B["b"].weight.data.mul_(3)
            elif edit == ".data =":
                layer.lora_B["b"].weight.data = layer.lora_B["b"].weight.data * 3
            else:
                layer.lora_B["b"].weight = torch.nn.Parameter(layer.lora_B["b"].weight * 3)
        if edit == ".data in place":
            m.train()
        m.eval()
    with torch.no_grad():
        assert_close(out(impl, x, adapter_names=names), _per_sample(ref, x, names), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("active", ["a", "c"])
def test_modules_to_save_of_some_adapters_only(active):
    """"c" trains its own lm_head (modules_to_save), "a" does not: in a mixed batch each row gets its adapter's
    head, or the original one, whichever adapter is active. Deliberate difference: PEFT raises KeyError('a')."""
    _, ref, impl = make_pair("llama", adapter_name="a", r=2)
    add_both(ref, impl, "c", "llama", seed=3, r=4, modules_to_save=["lm_head"])
    with torch.no_grad():
        for n, p in impl.named_parameters():
            if "modules_to_save.c" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    impl.set_adapter(active)
    impl.eval()
    names = ["a", "c", "__base__", "c"]
    x = inputs("llama", batch=len(names), seq=4, seed=3)
    with torch.no_grad():
        mixed = out(impl, x, adapter_names=names)
        alone = _per_sample(impl, x, names)
        impl.set_adapter(active)
        generated = impl.generate(**x, adapter_names=names, max_new_tokens=3, do_sample=False)
        for i, name in enumerate(names):
            xi = {k: v[i:i + 1] for k, v in x.items()}
            if name == "__base__":
                with impl.disable_adapter():
                    row = impl.generate(**xi, max_new_tokens=3, do_sample=False)
            else:
                impl.set_adapter(name)
                row = impl.generate(**xi, max_new_tokens=3, do_sample=False)
            assert torch.equal(generated[i:i + 1], row), name
    assert_close(mixed, alone, atol=2e-5, rtol=2e-5)


def test_copies_start_without_stacks_and_build_their_own():
    """deepcopy / pickling leave the stacks (a copy of every adapter) behind: the copy builds its own from its own
    parameters at its first mixed batch, so an edit to the copy is served, and the original keeps its stacks."""
    import copy

    ref, impl, x = _two_built({}, {})
    for m in (ref, impl):
        m.eval()
    names = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        out(impl, x, adapter_names=names)
        twin = copy.deepcopy(impl)
        layers = [m for m in twin.modules() if isinstance(m, LoraLinear)]
        assert layers and all(m._stack_cache is None for m in layers)
        assert any(m._stack_cache is not None for m in impl.modules() if isinstance(m, LoraLinear))
        for (n, p), (_, q) in zip(twin.named_parameters(), ref.named_parameters()):
            if "lora_B" in n:
                p.mul_(2)
                q.mul_(2)
        assert_close(out(twin, x, adapter_names=names), _per_sample(ref, x, names), atol=2e-5, rtol=2e-5)
