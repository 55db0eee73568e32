"""Mixed-adapter batches (`adapter_names=[...]`, one name per sample, "__base__" for none), forward and generate."""
import importlib
import warnings

import pytest
import torch

from tiny_models import (
    AGAINST_PEFT,
    add_both,
    assert_close,
    impl,
    inputs,
    make_pair,
    out,
    peft_fast_only,
    set_active,
)

# three adapters with different ranks / alphas / targets, as (name, LoraConfig overrides)
ADAPTERS = {
    "llama": [
        ("a", {"r": 2, "lora_alpha": 4}),
        ("b", {"r": 4, "lora_alpha": 16, "target_modules": ["k_proj", "o_proj", "up_proj"]}),
        ("c", {"r": 8, "lora_alpha": 8, "use_rslora": True, "lora_dropout": 0.2}),
    ],
    "gpt2": [
        ("a", {"r": 2, "lora_alpha": 4}),
        ("b", {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn"]}),
        ("c", {"r": 8, "lora_alpha": 8, "rank_pattern": {"c_fc": 3}}),
    ],
    "mlp": [
        ("a", {"r": 2, "lora_alpha": 4}),
        ("b", {"r": 4, "lora_alpha": 16, "target_modules": ["lin1", "lin2"]}),
        ("c", {"r": 8, "lora_alpha": 8, "alpha_pattern": {"lin0": 1}}),
    ],
}
NAMES = ["a", "__base__", "c", "b", "a", "c"]


def _three(kind, **extra):
    (n0, kw0), *rest = ADAPTERS[kind]
    base, r, i = make_pair(kind, adapter_name=n0, **kw0, **extra)
    for k, (n, kw) in enumerate(rest):
        add_both(r, i, n, kind, seed=10 + k, **kw, **extra)
    # (PEFT creates the new adapters' dropout modules in training mode: eval() after adding)
    base.eval()
    r.eval()
    i.eval()
    return base, r, i


def _x(kind):
    return inputs(kind, batch=len(NAMES), seq=5, seed=3)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mlp"])
def test_mixed_batch_matches_peft_and_single_adapter_runs(kind):
    base, r, i = _three(kind)
    x = _x(kind)
    with torch.no_grad():
        expected = out(r, x, adapter_names=NAMES)
        got = out(i, x, adapter_names=NAMES)
    assert_close(got, expected)

    # each sample equals running it alone with its adapter (or the base model)
    for j, name in enumerate(NAMES):
        xj = {k: v[j : j + 1] for k, v in x.items()}
        with torch.no_grad():
            if name == "__base__":
                with i.disable_adapter():
                    alone = out(i, xj)
                assert_close(alone, out(base, xj))
            else:
                set_active(i, name)
                alone = out(i, xj)
        assert_close(got[j : j + 1], alone, msg=f"sample {j} ({name})")
    # the adapters are really different from each other and from the base model
    assert not torch.allclose(got[0], got[2], atol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-4)


EQUAL_RANK_NAMES = ["a", "__base__", "b", "c", "a", "b", "c", "d"]


@pytest.mark.parametrize("extra", [{}, {"lora_bias": True}], ids=["lora", "lora_bias"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapters_of_one_rank_match_peft(kind, extra, monkeypatch):
    """Adapters that share a rank take the CPU reference's batched form (kernels/common/rank_buckets.py); the
    batches above, of three different ranks, take its per-adapter loop."""
    module = importlib.import_module("peft_fast.kernels.multi_lora")  # the package's `multi_lora` is the function
    calls = []
    real = module.bucket_deltas
    monkeypatch.setattr(module, "bucket_deltas", lambda *a: calls.append(1) or real(*a))
    base, r, i = make_pair(kind, adapter_name="a", r=4, lora_alpha=8, init_lora_weights=False, **extra)
    for k, name in enumerate("bcd"):
        add_both(r, i, name, kind, seed=10 + k, r=4, lora_alpha=4 * (k + 1), init_lora_weights=False, **extra)
    r.eval()
    i.eval()
    x = inputs(kind, batch=len(EQUAL_RANK_NAMES), seq=3, seed=3)
    with torch.no_grad():
        got, want = out(i, x, adapter_names=EQUAL_RANK_NAMES), out(r, x, adapter_names=EQUAL_RANK_NAMES)
    assert_close(got, want)
    assert calls or AGAINST_PEFT, "the batched form did not run"


@pytest.mark.parametrize("extra", [{}, {"lora_bias": True}], ids=["lora", "lora_bias"])
@pytest.mark.parametrize("ranks", ["equal", "mixed"])
def test_mixed_batch_under_autocast_matches_peft(ranks, extra):
    """torch.autocast around a float32 model (as after cast_mixed_precision_params): the batched form runs its
    matmuls in the stacks' dtype (autocast would have made its two bmm disagree), the per-adapter loop as PEFT's;
    both within bf16 rounding of PEFT."""
    base, r, i = make_pair("llama", adapter_name="a", r=4, lora_alpha=8, init_lora_weights=False, **extra)
    for k, name in enumerate("bcd"):
        add_both(r, i, name, "llama", seed=10 + k, r=4 if ranks == "equal" else 2 + 2 * k, lora_alpha=8,
                 init_lora_weights=False, **extra)
    r.eval()
    i.eval()
    x = inputs("llama", batch=len(EQUAL_RANK_NAMES), seq=3, seed=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = out(i, x, adapter_names=EQUAL_RANK_NAMES), out(r, x, adapter_names=EQUAL_RANK_NAMES)
    assert got.dtype == want.dtype
    assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_mixed_batch_leaves_active_adapter_alone(kind):
    _, r, i = _three(kind)
    set_active(r, "b")
    set_active(i, "b")
    x = _x(kind)
    with torch.no_grad():
        before = out(i, x)
        out(i, x, adapter_names=NAMES)
        after = out(i, x)
    assert i.active_adapter == "b"
    assert torch.equal(before, after)
    assert_close(after, out(r, x).detach())


def test_mixed_batch_all_base_and_all_one_adapter():
    base, r, i = _three("llama")
    x = _x("llama")
    n = len(NAMES)
    with torch.no_grad():
        assert_close(out(i, x, adapter_names=["__base__"] * n), out(base, x))
        set_active(i, "c")
        assert_close(out(i, x, adapter_names=["c"] * n), out(i, x))
        assert_close(out(i, x, adapter_names=["c"] * n), out(r, x, adapter_names=["c"] * n))


def test_mixed_batch_with_modules_to_save():
    base, r, i = make_pair("mlp", adapter_name="a", r=2, modules_to_save=["lin2"])
    add_both(r, i, "b", "mlp", seed=1, r=4, modules_to_save=["lin2"])
    # make the saved copies differ from the original module
    with torch.no_grad():
        for model in (r, i):
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.1 * torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / p.numel())
    base.eval()
    r.eval()
    i.eval()
    names = ["a", "b", "__base__", "b"]
    x = inputs("mlp", batch=4)
    with torch.no_grad():
        expected = out(r, x, adapter_names=names)
        assert_close(out(i, x, adapter_names=names), expected)
        assert_close(expected[2:3], out(base, {"X": x["X"][2:3]}))


def test_generate_with_adapter_names():
    max_new_tokens = 4
    _, r, i = _three("llama")
    names = ["a", "__base__", "c", "b"]
    ids = inputs("llama", batch=len(names), seq=5, seed=4)["input_ids"]
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = r.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
        got = i.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
        assert got.shape == (len(names), 5 + max_new_tokens)
        assert torch.equal(got, expected)
        for j, name in enumerate(names):
            if name == "__base__":
                with i.disable_adapter():
                    alone = i.generate(input_ids=ids[j : j + 1], attention_mask=mask[j : j + 1], **kw)
            else:
                set_active(i, name)
                alone = i.generate(input_ids=ids[j : j + 1], attention_mask=mask[j : j + 1], **kw)
            assert torch.equal(got[j : j + 1], alone), f"sample {j} ({name})"
    # not all samples generated the same continuation (the adapters matter)
    assert len({tuple(row[5:].tolist()) for row in got}) > 1


def test_mixed_batch_default_config_llama():
    """The simplest case: one adapter plus the base model."""
    base, r, i = make_pair("llama")
    base.eval()
    r.eval()
    i.eval()
    x = inputs("llama", batch=2)
    with torch.no_grad():
        got = out(i, x, adapter_names=["default", "__base__"])
        assert_close(got, out(r, x, adapter_names=["default", "__base__"]))
        assert_close(got[1:], out(base, {"input_ids": x["input_ids"][1:]}))


@peft_fast_only  # PEFT routes adapter_names through hooks any thread's forward picks up (2 of 10 wrong here)
def test_concurrent_mixed_batches_and_plain_forwards_stay_apart():
    """Two threads with different mixes and a third running plain forwards, at once: each sees its own batch
    (the batch reaches the layers through per-thread state, not through the shared modules)."""
    import threading

    _, r, i = _three("llama")
    x = _x("llama")
    batches = [NAMES, list(reversed(NAMES))]
    with torch.no_grad():
        expected = [out(r, x, adapter_names=list(b)) for b in batches] + [out(r, x)]
    results, errors = {0: [], 1: [], 2: []}, []

    def run(k):
        try:
            with torch.no_grad():
                for _ in range(6):
                    kw = {"adapter_names": list(batches[k])} if k < 2 else {}
                    results[k].append(out(i, x, **kw))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in (0, 1, 2):
        assert len(results[k]) == 6
        for y in results[k]:
            assert_close(y, expected[k])


@peft_fast_only
def test_threads_starting_at_once_after_an_event_build_the_stacks_once():
    """After add_adapter grows the stacks (a larger rank), two threads start mixed batches at once: one writes the
    slots while the other waits (before: one could allocate new stacks halfway through the other's writes, leaving
    a slot empty that its signature called up to date, wrong until the next event). Slow writes widen the window."""
    import threading
    import time

    from peft_fast.tuners.lora import stacks

    real_write, real_alloc = stacks.write_slot, stacks.StackCache._allocate

    def slow_write(*a, **k):
        time.sleep(0.0005)
        return real_write(*a, **k)

    calls: dict = {}

    def slow_alloc(self, *a, **k):  # a second allocation of one cache lands amid the first one's writes
        calls[id(self)] = calls.get(id(self), 0) + 1
        time.sleep(0.001 if calls[id(self)] == 1 else 0.0025)
        return real_alloc(self, *a, **k)

    _, r, i = _three("llama")
    x = _x("llama")
    names = list(NAMES)
    with torch.no_grad():
        out(i, x, adapter_names=names)  # stacks built
    add_both(r, i, "big", "llama", seed=9, r=16)
    for m in (r, i):
        m.eval()
    names[0] = "big"
    with torch.no_grad():
        expected = out(r, x, adapter_names=names)
    results, errors, barrier = {}, [], threading.Barrier(2)

    def run(k):
        try:
            barrier.wait()
            with torch.no_grad():
                results[k] = out(i, x, adapter_names=names)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    stacks.write_slot, stacks.StackCache._allocate = slow_write, slow_alloc
    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stacks.write_slot, stacks.StackCache._allocate = real_write, real_alloc
    assert not errors, errors
    for k in (0, 1):
        assert_close(results[k], expected)
    with torch.no_grad():
        assert_close(out(i, x, adapter_names=names), expected)


@peft_fast_only
def test_adapters_added_and_deleted_while_threads_serve_other_adapters():
    """A server loading and dropping adapters beside threads serving mixed batches of the others: every batch
    completes with its own outputs (the layers ready their stacks before or after a change, never amid it)."""
    import threading
    import time

    _, r, i = _three("llama")
    x = _x("llama")
    with torch.no_grad():
        expected = out(i, x, adapter_names=list(NAMES))
    done, errors, served = threading.Event(), [], [0]

    def serve():
        try:
            while not done.is_set():
                with torch.no_grad():
                    assert_close(out(i, x, adapter_names=list(NAMES)), expected)
                served[0] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for k in range(30):
            i.add_adapter("new", impl.LoraConfig(r=2 + 6 * (k % 2), target_modules=["q_proj", "up_proj"]))
            time.sleep(0.005)
            i.delete_adapter("new")
            time.sleep(0.005)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert served[0] > 0


def _state_of(model, name, scale):
    return {k: v * scale for k, v in impl.get_peft_model_state_dict(model, adapter_name=name).items()}


def _doubled(i, w0):
    return torch.equal(i.base_model.model.lin0.lora_A["a"].weight, 2 * w0)


# What changes the adapters a mixed batch reads, each as a function of the model, and the check that it happened
# (given adapter a's A in lin0 from before)
CHANGES = {
    "add_adapter": (lambda i: i.add_adapter("new", impl.LoraConfig(r=2, target_modules=["lin0", "lin1"])),
                    lambda i, w0: "new" in i.peft_config),
    "set_adapter": (lambda i: i.set_adapter("b"), lambda i, w0: i.active_adapter == "b"),
    "merge_adapter": (lambda i: i.merge_adapter(["a"]), lambda i, w0: i.base_model.model.lin0.merged),
    "load_state_dict": (lambda i: i.load_state_dict({k: v * 2 for k, v in i.state_dict().items()
                                                     if "lora_A.a." in k}, strict=False), _doubled),
    "set_peft_model_state_dict": (lambda i: impl.set_peft_model_state_dict(i, _state_of(i, "a", 2.0), "a"),
                                  _doubled),
    "hotswap": (lambda i: impl.hotswap_adapter_from_state_dict(i, _state_of(i, "a", 2.0), "a", i.peft_config["a"]),
                _doubled),
    "add_weighted_adapter": (lambda i: i.add_weighted_adapter(["a", "c"], [1.0, 1.0], "ac", "cat"),
                             lambda i, w0: "ac" in i.peft_config),
}


@peft_fast_only
@pytest.mark.parametrize("change", list(CHANGES))
def test_an_adapter_change_waits_for_the_batch_in_flight(change):
    """A batch paused inside its forward (at its first layer): a change of adapters in another thread (adding one,
    activating, merging, loading weights, hot-swapping) waits until it is done, so the batch finishes with the
    model it started with."""
    import threading

    _, r, i = _three("mlp")
    x = _x("mlp")
    with torch.no_grad():
        expected = out(i, x, adapter_names=list(NAMES))
    inside, release, added = threading.Event(), threading.Event(), threading.Event()
    got = []
    handle = i.base_model.model.lin0.register_forward_pre_hook(
        lambda m, args: (inside.set(), release.wait(timeout=30)) and None)
    make, happened = CHANGES[change]
    w0 = i.base_model.model.lin0.lora_A["a"].weight.detach().clone()

    def serve():
        with torch.no_grad():
            got.append(out(i, x, adapter_names=list(NAMES)))

    def change():
        make(i)
        added.set()

    server = threading.Thread(target=serve)
    server.start()
    assert inside.wait(timeout=30)
    changer = threading.Thread(target=change)
    changer.start()
    try:
        assert not added.wait(timeout=0.5)  # held while the batch is in flight
    finally:
        release.set()
        server.join(timeout=30)
        changer.join(timeout=30)
        handle.remove()
    assert added.is_set() and happened(i, w0)
    assert_close(got[0], expected)
