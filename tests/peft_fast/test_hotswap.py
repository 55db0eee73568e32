"""Hot-swapping adapters in place (peft_fast.hotswap, PEFT's peft.utils.hotswap): same outputs as loading the new
adapter fresh, no recompilation after torch.compile, and refused swaps that change nothing."""
import json
import shutil
import warnings

import pytest
import torch
from peft.utils import hotswap as ref_hotswap
from safetensors.torch import load_file, save_file

from tiny_models import (
    AGAINST_PEFT,
    assert_close,
    assert_unchanged,
    base_model,
    default_cfg,
    impl,
    inputs,
    make_pair,
    out,
    peft_fast_only,
    ref,
    snapshot,
)

if AGAINST_PEFT:
    hs = ref_hotswap
else:
    from peft_fast.tuners.lora import hotswap as hs

# name -> (kind, LoraConfig overrides, seed). "a0" is the adapter loaded first; the others are swapped in.
ADAPTERS = {
    "a0": ("llama", {}, 0),
    "small": ("llama", {"r": 2, "lora_alpha": 16}, 1),
    "same_rank": ("llama", {"lora_alpha": 5}, 2),
    "big": ("llama", {"r": 8, "lora_alpha": 4}, 3),
    "subset": ("llama", {"target_modules": ["q_proj"], "r": 6}, 4),
    "pattern": ("llama", {"rank_pattern": {"q_proj": 8, "down_proj": 2}}, 5),
    "new_layer": ("llama", {"target_modules": ["q_proj", "k_proj"]}, 6),
    "too_big": ("llama", {"r": 16}, 7),
    "dropout": ("llama", {"lora_dropout": 0.1}, 8),
    "rslora": ("llama", {"use_rslora": True}, 9),
    "alpha_pattern": ("llama", {"alpha_pattern": {"q_proj": 3}}, 10),
    "mts": ("llama", {"modules_to_save": ["lm_head"]}, 11),
    "m0": ("mlp", {}, 12),
    "m_small": ("mlp", {"r": 2, "lora_alpha": 3}, 13),
    "m_subset": ("mlp", {"target_modules": ["lin1"], "r": 8}, 14),
}


def _build(kind, kw, seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return impl.get_peft_model(base_model(kind), impl.LoraConfig(**default_cfg(kind, **kw)))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    paths = {}
    for name, (kind, kw, seed) in ADAPTERS.items():
        paths[name] = str(root / name)
        _build(kind, kw, seed).save_pretrained(paths[name])
    # use_dora: only the config differs (a DoRA file would also need magnitudes); the check refuses it first. The
    # weights are rewritten as PEFT writes them (no copy of the config inside, which would refuse the edit earlier).
    paths["decomposed"] = str(root / "decomposed")
    shutil.copytree(paths["a0"], paths["decomposed"])
    cfg_path = paths["decomposed"] + "/adapter_config.json"
    with open(cfg_path) as f:
        cfg = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump({**cfg, "use_dora": True}, f)
    weights = paths["decomposed"] + "/adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    return paths


def load(path, kind="llama"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return impl.PeftModel.from_pretrained(base_model(kind), path)


@pytest.fixture(scope="module")
def fresh_out(adapters):
    """Output of each adapter loaded fresh with PeftModel.from_pretrained: what a swap must reproduce."""
    cache = {}

    def get(name):
        if name not in cache:
            kind = ADAPTERS[name][0]
            with torch.no_grad():
                cache[name] = out(load(adapters[name], kind), inputs(kind))
        return cache[name]

    return get


def scalings(model):
    return {(k, n): float(v) for k, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)
            for n, v in m.scaling.items()}


def full_snapshot(model):
    return snapshot(model), scalings(model), [(n, p.data_ptr()) for n, p in model.named_parameters()]


def assert_full_unchanged(model, snap):
    assert_unchanged(model, snap[0])
    assert scalings(model) == snap[1]
    assert [(n, p.data_ptr()) for n, p in model.named_parameters()] == snap[2]


# ------------------------------------------------------------------------------------------------ prepare
def test_prepare_pads_like_peft_and_keeps_outputs():
    _, ref_model, impl_model = make_pair("llama", rank_pattern={"q_proj": 2})
    x = inputs("llama")
    with torch.no_grad():
        before = out(impl_model, x)
    ref_hotswap.prepare_model_for_compiled_hotswap(ref_model, target_rank=8, config=ref_model.peft_config)
    hs.prepare_model_for_compiled_hotswap(impl_model, target_rank=8, config=impl_model.peft_config)
    with torch.no_grad():
        assert_close(out(impl_model, x), before)
        assert_close(out(impl_model, x), out(ref_model, x))
    assert_close(impl_model.state_dict(), ref_model.state_dict())  # same keys, padded shapes and zeros
    for cfg in (ref_model.peft_config["default"], impl_model.peft_config["default"]):
        assert cfg.r == 8 and cfg.rank_pattern == {"q_proj": 8}
    layers = [m for m in impl_model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert layers
    for m in layers:
        s = m.scaling["default"]
        assert isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype == torch.float32
        assert s.device == m.lora_A["default"].weight.device
        assert m.lora_A["default"].weight.shape[0] == m.lora_B["default"].weight.shape[1] == 8


def test_prepare_without_target_rank_only_converts_scalings():
    model = _build("mlp", {}, 0)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    hs.prepare_model_for_compiled_hotswap(model, config=model.peft_config)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert model.peft_config["default"].r == 4
    assert scalings(model) == {(k, "default"): 2.0 for k in ("base_model.model.lin0", "base_model.model.lin1")}


def test_prepare_check_compiled():
    for check in ("error", "warn", "ignore"):
        model = torch.compile(_build("mlp", {}, 0), backend="eager")  # lazy: nothing is compiled here
        if check == "error":
            with pytest.raises(ValueError, match="before"):
                hs.prepare_model_for_compiled_hotswap(model, target_rank=8, check_compiled=check)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hs.prepare_model_for_compiled_hotswap(model, target_rank=8, check_compiled=check)
        assert any("already compiled" in str(w.message) for w in caught) == (check == "warn")
    model = torch.compile(_build("mlp", {}, 0), backend="eager")
    with pytest.raises(ValueError, match="check_compile"):
        hs.prepare_model_for_compiled_hotswap(model, target_rank=8, check_compiled="sometimes")


def test_prepare_refuses():
    with pytest.raises(ValueError, match="No adapter layers found"):
        hs.prepare_model_for_compiled_hotswap(base_model("mlp"))
    model = _build("mlp", {"rank_pattern": {"lin1": 8}}, 0)
    snap = full_snapshot(model)
    with pytest.raises(ValueError, match="original rank is larger"):
        hs.prepare_model_for_compiled_hotswap(model, target_rank=6)
    if not AGAINST_PEFT:  # PEFT converts the scalings and pads lin0 before it finds lin1 too large
        assert_full_unchanged(model, snap)


# ------------------------------------------------------------------------------------------------ swapping
SWAPS = ["small", "same_rank", "big", "subset", "pattern", "a0"]


@pytest.mark.parametrize("name", SWAPS)
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "unprepared"])
def test_hotswap_matches_fresh_load(adapters, fresh_out, name, prepared):
    if name == "pattern" and AGAINST_PEFT:
        pytest.skip("PEFT matches rank_pattern keys against full parameter names: its swapped scalings are wrong")
    model = load(adapters["a0"])
    if prepared:
        hs.prepare_model_for_compiled_hotswap(model, target_rank=8)
    params = {n: p for n, p in model.named_parameters()}
    hs.hotswap_adapter(model, adapters[name], adapter_name="default")
    with torch.no_grad():
        assert_close(out(model, inputs("llama")), fresh_out(name))
    if prepared:  # in place: the same parameter objects, storages and shapes
        assert all(p is params[n] and p.data_ptr() == params[n].data_ptr() for n, p in model.named_parameters())
        assert all(isinstance(s, torch.Tensor) for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)
                   for s in m.scaling.values())


def test_subset_zeroes_untargeted_layers(adapters):
    model = load(adapters["a0"])
    hs.prepare_model_for_compiled_hotswap(model, target_rank=8)
    hs.hotswap_adapter(model, adapters["subset"], "default")
    for name, p in model.named_parameters():
        if ".lora_" in name and "q_proj" not in name:
            assert not p.any(), name
        elif "q_proj.lora_A" in name:
            assert p[:6].any() and not p[6:].any()


def test_hotswap_matches_peft_hotswap(adapters):
    ref_model = ref.PeftModel.from_pretrained(base_model("llama"), adapters["a0"])
    impl_model = load(adapters["a0"])
    for lib, model in ((ref_hotswap, ref_model), (hs, impl_model)):
        lib.prepare_model_for_compiled_hotswap(model, target_rank=8)
        lib.hotswap_adapter(model, adapters["small"], "default")
        lib.hotswap_adapter(model, adapters["subset"], "default")
    assert_close(impl_model.state_dict(), ref_model.state_dict())
    assert scalings(impl_model) == pytest.approx(scalings(ref_model))
    with torch.no_grad():
        assert_close(out(impl_model, inputs("llama")), out(ref_model, inputs("llama")))


def test_hotswap_from_state_dict_key_forms(adapters, fresh_out):
    """PEFT's keys (adapter name inserted, as in model.state_dict()) and file keys both work."""
    from safetensors.torch import load_file

    tensors = load_file(f"{adapters['small']}/adapter_model.safetensors")
    config = impl.LoraConfig.from_pretrained(adapters["small"])
    peft_keys = {k.replace(".weight", ".default.weight") if ".lora_" in k else k: v for k, v in tensors.items()}
    for state_dict in (peft_keys, tensors) if not AGAINST_PEFT else (peft_keys,):
        model = load(adapters["a0"])
        hs.prepare_model_for_compiled_hotswap(model, target_rank=8)
        hs.hotswap_adapter_from_state_dict(model, state_dict, "default", config)
        with torch.no_grad():
            assert_close(out(model, inputs("llama")), fresh_out("small"))


def test_swapped_adapter_in_mixed_batch_and_merge(adapters, fresh_out):
    """A prepared, swapped adapter serves adapter_names batches next to another adapter, and merges."""
    model = load(adapters["a0"])
    model.load_adapter(adapters["same_rank"], "other")
    hs.prepare_model_for_compiled_hotswap(model, target_rank=8)
    hs.hotswap_adapter(model, adapters["small"], "default")
    x = inputs("llama", batch=3)
    with torch.no_grad():
        mixed = out(model, x, adapter_names=["default", "other", "__base__"])
        base = out(base_model("llama"), x)
        assert_close(mixed[0], fresh_out("small")[0])
        assert_close(mixed[1], fresh_out("same_rank")[1])
        assert_close(mixed[2], base[2])
        model.merge_adapter(["default"])
        assert_close(out(model, x), fresh_out("small"), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ refusals
REFUSALS = [  # PEFT swaps a larger rank in (breaking the compiled graph) and fails half-way on modules_to_save
    pytest.param("new_layer", RuntimeError, "unexpected keys found", id="new_layer"),
    pytest.param("too_big", ValueError, "larger than the rank 8", id="too_big", marks=peft_fast_only),
    pytest.param("dropout", ValueError, "for lora_dropout, 0.0 != 0.1", id="dropout"),
    pytest.param("rslora", ValueError, "for use_rslora, False != True", id="rslora"),
    pytest.param("alpha_pattern", ValueError, "for alpha_pattern", id="alpha_pattern"),
    pytest.param("decomposed", ValueError, "for use_dora, False != True", id="decomposed"),
    pytest.param("mts", RuntimeError, "unexpected keys found", id="modules_to_save", marks=peft_fast_only),
]


@pytest.mark.parametrize("name,exc,match", REFUSALS)
def test_refused_swap_changes_nothing(adapters, fresh_out, name, exc, match):
    model = load(adapters["a0"])
    hs.prepare_model_for_compiled_hotswap(model, target_rank=8)
    hs.hotswap_adapter(model, adapters["small"], "default")
    snap = full_snapshot(model)
    with pytest.raises(exc, match=match):
        hs.hotswap_adapter(model, adapters[name], "default")
    assert_full_unchanged(model, snap)
    with torch.no_grad():
        assert_close(out(model, inputs("llama")), fresh_out("small"))


@peft_fast_only
def test_refused_swap_bad_shapes_changes_nothing(adapters):
    from safetensors.torch import load_file

    model = load(adapters["a0"])
    hs.prepare_model_for_compiled_hotswap(model, target_rank=8)
    snap = full_snapshot(model)
    tensors = load_file(f"{adapters['small']}/adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"expected \(4, 64\)"):  # the config says r=4, the tensors have rank 2
        hs.hotswap_adapter_from_state_dict(model, tensors, "default", impl.LoraConfig.from_pretrained(adapters["a0"]))
    key = next(k for k in tensors if "lora_B" in k)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        hs.hotswap_adapter_from_state_dict(model, {key: tensors[key]}, "default",
                                           impl.LoraConfig.from_pretrained(adapters["small"]))
    assert_full_unchanged(model, snap)


def test_refuses_merged_and_unknown_adapter(adapters):
    model = load(adapters["a0"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        hs.hotswap_adapter(model, adapters["small"], "default")
    model.unmerge_adapter()
    snap = full_snapshot(model)
    with pytest.raises(RuntimeError, match="other"):
        hs.hotswap_adapter(model, adapters["small"], "other")
    assert_full_unchanged(model, snap)


def test_check_hotswap_configs_compatible():
    hs.check_hotswap_configs_compatible(impl.LoraConfig(r=4, lora_alpha=3), impl.LoraConfig(r=16, lora_alpha=9))
    with pytest.raises(ValueError, match="use_rslora"):
        hs.check_hotswap_configs_compatible(impl.LoraConfig(), impl.LoraConfig(use_rslora=True))


# ------------------------------------------------------------------------------------------------ compiled
def _run_compiled(model, x):
    with torch.no_grad():
        return out(model, x)


@pytest.mark.parametrize("kind,backend,loaded,swaps", [
    ("llama", "aot_eager", "a0", ["small", "subset", "pattern", "big", "a0"]),
    ("mlp", "inductor", "m0", ["m_small", "m_subset", "m0"]),
])
def test_compiled_hotswap_does_not_recompile(adapters, fresh_out, kind, backend, loaded, swaps):
    if AGAINST_PEFT and kind == "llama":
        swaps = [s for s in swaps if s != "pattern"]
    torch._dynamo.reset()
    model = load(adapters[loaded], kind)
    hs.prepare_model_for_compiled_hotswap(model, target_rank=8)
    compiled = torch.compile(model, backend=backend)
    x = inputs(kind)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert_close(_run_compiled(compiled, x), fresh_out(loaded))
            for name in swaps:
                hs.hotswap_adapter(compiled, adapters[name], "default")
                assert_close(_run_compiled(compiled, x), fresh_out(name), msg=name)
            if kind == "llama" and not AGAINST_PEFT:  # refused while compiled: unchanged, still no recompile
                snap = full_snapshot(model)
                for bad in ("too_big", "new_layer"):
                    with pytest.raises((ValueError, RuntimeError)):
                        hs.hotswap_adapter(compiled, adapters[bad], "default")
                assert_full_unchanged(model, snap)
                assert_close(_run_compiled(compiled, x), fresh_out(swaps[-1]))
    finally:
        torch._dynamo.reset()


def test_unprepared_compiled_swap_recompiles(adapters):
    """The control: without prepare, a new alpha is a new graph constant, so error_on_recompile does fire."""
    torch._dynamo.reset()
    compiled = torch.compile(load(adapters["m0"], "mlp"), backend="aot_eager")
    x = inputs("mlp")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            _run_compiled(compiled, x)
            hs.hotswap_adapter(compiled, adapters["m_small"], "default")  # rank 2 into rank 4, scaling 2.0 -> 1.5
            with pytest.raises(Exception, match="[Rr]ecompil"):
                _run_compiled(compiled, x)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("with_config", [False, True], ids=["config-untouched", "config-updated"])
def test_files_of_prepared_model_load_as_in_peft(tmp_path, with_config):
    """Saving a prepared model behaves as in PEFT: without config= the file's rank disagrees with its config and
    neither library loads it; with config= both load it, with scaling alpha / target_rank (not the prepared model's
    alpha / r): PEFT and peft_fast files and loads agree either way."""
    _, ref_model, impl_model = make_pair("llama")
    for lib, model in ((ref_hotswap, ref_model), (hs, impl_model)):
        lib.prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config if with_config else None)
    ref_model.save_pretrained(tmp_path / "ref")
    impl_model.save_pretrained(tmp_path / "impl")
    x = inputs("llama")
    for lib in (ref, impl):
        if not with_config:
            with pytest.raises((RuntimeError, ValueError)):
                lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / "impl"))
            continue
        with torch.no_grad():
            a = out(lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / "impl")), x)
            b = out(ref.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / "ref")), x)
        assert_close(a, b)


def _mixed(model, x):
    return out(model, x, adapter_names=["default", "other", "__base__"])


@peft_fast_only
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_swap_after_a_mixed_batch_is_served_by_the_next_one(adapters, compiled):
    """Stacks built by a mixed batch before a swap (eval mode trusts them until an event) are dropped by the swap:
    the next mixed batch serves the new weights. Compiled, the stale layers are rewritten by the batch plan outside
    the graph: no recompilation."""
    model = load(adapters["a0"])
    model.load_adapter(adapters["same_rank"], "other")
    hs.prepare_model_for_compiled_hotswap(model, target_rank=8)
    model.eval()
    x = inputs("llama")
    with torch.no_grad():
        want = out(load(adapters["small"]), x)
    torch._dynamo.reset()
    run = torch.compile(model, backend="aot_eager") if compiled else model
    try:
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            _mixed(run, x)  # stacks built
            hs.hotswap_adapter(run, adapters["small"], "default")
            got = _mixed(run, x)
    finally:
        torch._dynamo.reset()
    assert_close(got[0], want[0])


@peft_fast_only
def test_an_unprepared_swap_of_a_larger_rank_serves_mixed_batches(adapters):
    """Unprepared, a larger rank changes the parameters' shape (as in PEFT): the layer's r follows, since the
    mixed-batch stacks are sized and written from it."""
    model = load(adapters["a0"])
    model.load_adapter(adapters["same_rank"], "other")
    model.eval()
    hs.hotswap_adapter(model, adapters["big"], "default")
    x = inputs("llama")
    with torch.no_grad():
        got, want = _mixed(model, x), out(load(adapters["big"]), x)
    assert_close(got[0], want[0])
