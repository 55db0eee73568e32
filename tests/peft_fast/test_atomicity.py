"""peft_fast-only guarantee: an operation that is refused leaves the model exactly as it was.

PEFT works layer by layer and raises part way through (earlier layers already merged, adapters half added,
modules_to_save half switched), so all of these tests are skipped when the suite runs against PEFT."""
import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

from tiny_models import base_model, default_cfg, impl, inputs, out, peft_fast_only, snapshot

pytestmark = peft_fast_only


# ------------------------------------------------------------------------------------------ helpers
def _full_snapshot(model):
    """tiny_models.snapshot (modules, values, requires_grad, adapter names, active adapters) plus every layer's
    merged/active/disabled adapters, training flags and the full content of each adapter's config."""
    snap = snapshot(model)
    snap["layers"] = {
        n: (
            list(getattr(m, "merged_adapters", [])),
            list(getattr(m, "active_adapters", [])),
            getattr(m, "disable_adapters", None),
        )
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") or type(m).__name__ == "ModulesToSaveWrapper"
    }
    snap["training"] = {n: m.training for n, m in model.named_modules()}
    snap["configs"] = {k: copy.deepcopy(v.to_dict()) for k, v in model.peft_config.items()}
    return snap


def _assert_untouched(model, snap):
    now = _full_snapshot(model)
    assert now["modules"] == snap["modules"], "module tree changed"
    assert set(now["state"]) == set(snap["state"]), "state_dict keys changed"
    changed = [k for k, v in snap["state"].items() if not torch.equal(now["state"][k], v)]
    assert not changed, f"values changed: {changed[:8]}"
    rg = {n: (snap["requires_grad"][n], v) for n, v in now["requires_grad"].items() if v != snap["requires_grad"][n]}
    assert not rg, f"requires_grad changed (before, after): {rg}"
    for key in ("peft_config", "active_adapter", "active_adapters", "configs"):
        assert now[key] == snap[key], f"{key}: {snap[key]} -> {now[key]}"
    layers = {n: (snap["layers"].get(n), v) for n, v in now["layers"].items() if snap["layers"].get(n) != v}
    assert not layers, f"layer state (merged, active, disabled) changed (before, after): {layers}"
    assert now["training"] == snap["training"], "training flags changed"


def _out(model, kind):
    with torch.no_grad():
        return out(model, inputs(kind))


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _llama_model(dtype=torch.float32, **cfg):
    torch.manual_seed(0)
    kw = default_cfg("llama", target_modules=["q_proj", "v_proj"], **cfg)
    return impl.get_peft_model(base_model("llama").to(dtype), impl.LoraConfig(**kw))


def _last_v_proj(model):
    return model.get_base_model().model.layers[1].self_attn.v_proj


def _delta_fp32(layer, name):
    """B @ A * scaling computed in float32 (what a check in the compute dtype would see)."""
    a = layer.lora_A[name].weight.float()
    b = layer.lora_B[name].weight.float()
    return (b @ a) * layer.scaling[name]


MERGES = {
    "merge_adapter": lambda m: m.merge_adapter(safe_merge=True),
    "merge_and_unload": lambda m: m.merge_and_unload(safe_merge=True),
}


# ------------------------------------------------------------------------------------------ safe_merge
@pytest.mark.parametrize("op", list(MERGES))
def test_safe_merge_fp16_overflow_only_in_base_dtype(op):
    """The merged weight is finite in float32 but not in the float16 base dtype: refused, nothing merged."""
    m = _llama_model(torch.float16)
    m.eval()
    v = _last_v_proj(m)  # the last target layer: every other layer would already be merged layer by layer
    with torch.no_grad():
        v.base_layer.weight[0, 0] = 65000.0
        v.lora_B["default"].weight[0].fill_(30.0)
        v.lora_A["default"].weight[:, 0].fill_(30.0)
    merged32 = v.base_layer.weight.float() + _delta_fp32(v, "default")
    assert torch.isfinite(merged32).all(), "premise: finite in float32"
    assert not torch.isfinite(merged32.half()).all(), "premise: overflows in float16"
    snap = _full_snapshot(m)
    with pytest.raises(ValueError, match="default"):
        MERGES[op](m)
    _assert_untouched(m, snap)
    assert all(not layer.merged_adapters for layer in m.modules() if hasattr(layer, "merged_adapters"))


@pytest.mark.parametrize("op", list(MERGES))
def test_safe_merge_only_the_sum_of_two_adapters_overflows(op):
    """Each adapter alone merges to finite weights; both together overflow float32: refused, nothing merged."""
    m = _llama_model()
    torch.manual_seed(1)
    m.add_adapter("two", impl.LoraConfig(**default_cfg("llama", target_modules=["q_proj", "v_proj"])))
    m.set_adapter(["default", "two"])
    m.eval()
    v = _last_v_proj(m)
    with torch.no_grad():
        v.base_layer.weight[0, 0] = 3.3e38
        for name in ("default", "two"):
            v.lora_B[name].weight[0].fill_(1e18)
            v.lora_A[name].weight[:, 0].fill_(1e18)
    w = v.base_layer.weight
    d1, d2 = _delta_fp32(v, "default"), _delta_fp32(v, "two")
    assert torch.isfinite(w + d1).all() and torch.isfinite(w + d2).all(), "premise: each alone is finite"
    assert not torch.isfinite(w + d1 + d2).all(), "premise: the sum overflows"
    before = _out(m, "llama")
    snap = _full_snapshot(m)
    with _quiet():
        with pytest.raises(ValueError, match="two"):
            MERGES[op](m)
    _assert_untouched(m, snap)
    torch.testing.assert_close(_out(m, "llama"), before, equal_nan=True)
    # each adapter alone still merges (the refusal came from the sum, and left the model usable)
    m.merge_adapter(["default"], safe_merge=True)
    assert v.merged_adapters == ["default"]


@pytest.mark.parametrize("op", ["merge_adapter", "merge_and_unload"])
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_lora_bias_into_layer_without_bias(op, safe_merge):
    """lora_bias=True merges the LoRA bias into the base bias; the second target has none: refused, nothing merged
    (not even the first target, which does have a bias)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    cfg = impl.LoraConfig(r=2, target_modules=["0", "2"], lora_bias=True, init_lora_weights=False)
    with _quiet():  # warns that layer "2" has no bias, so merging will not be possible
        m = impl.get_peft_model(base, cfg)
    m.eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(x)
    snap = _full_snapshot(m)
    with pytest.raises(RuntimeError, match="lora_bias"):
        if op == "merge_adapter":
            m.merge_adapter(safe_merge=safe_merge)
        else:
            m.merge_and_unload(safe_merge=safe_merge)
    _assert_untouched(m, snap)
    with torch.no_grad():
        assert torch.equal(m(x), before)


# ------------------------------------------------------------------------------------------ add_adapter
def _mixed_dtype_mlp():
    """lin0 in float32 (PiSSA works and rewrites its base weight), lin1 in float64 (PiSSA refuses)."""
    mlp = base_model("mlp")
    mlp.lin1.double()
    return mlp


@pytest.mark.parametrize("dtype_case", ["float64_model", "fails_on_second_layer"])
def test_add_adapter_pissa_failing_midway_then_same_name_again(dtype_case):
    if dtype_case == "float64_model":
        base, targets = base_model("mlp").double(), ["lin0"]
    else:
        base, targets = _mixed_dtype_mlp(), ["lin0", "lin1"]
    torch.manual_seed(0)
    m = impl.get_peft_model(base, impl.LoraConfig(r=4, target_modules=["lin0"]))
    m.eval()
    snap = _full_snapshot(m)
    with _quiet():
        with pytest.raises(TypeError, match="float64"):
            m.add_adapter("p", impl.LoraConfig(r=4, target_modules=targets, init_lora_weights="pissa"))
    _assert_untouched(m, snap)
    assert not any(".p." in n for n, _ in m.named_parameters())
    # the name is free again: a working adapter can be added under it
    m.add_adapter("p", impl.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    assert list(m.peft_config) == ["default", "p"]
    assert m.active_adapter == "default"
    for t in targets:
        assert "p" in getattr(m.get_base_model(), t).lora_A
    if dtype_case == "fails_on_second_layer":
        return  # the mixed-dtype toy model cannot run a forward (float32 -> float64 activations)
    m.set_adapter("p")
    m.eval()
    x = {"X": inputs("mlp")["X"].double()}
    with torch.no_grad():
        y = out(m, x)
        with m.disable_adapter():
            y0 = out(m, x)
    assert torch.isfinite(y).all() and not torch.allclose(y, y0)


# ------------------------------------------------------------------------------------------ set_adapter
def _llama_with_modules_to_save_adapters():
    m = _llama_model()
    kw = default_cfg("llama", target_modules=["k_proj", "v_proj"], modules_to_save=["lm_head"])
    torch.manual_seed(1)
    m.add_adapter("two", impl.LoraConfig(**kw))
    torch.manual_seed(2)
    m.add_adapter("three", impl.LoraConfig(**dict(kw, target_modules=["q_proj", "v_proj"])))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5 if ".two." in n else -0.5)
    return m


def test_set_adapter_two_adapters_with_modules_to_save():
    m = _llama_with_modules_to_save_adapters()
    m.eval()
    before = _out(m, "llama")
    snap = _full_snapshot(m)
    with pytest.raises(ValueError, match="modules_to_save"):
        m.set_adapter(["two", "three"])
    _assert_untouched(m, snap)
    assert torch.equal(_out(m, "llama"), before)


def test_set_adapter_unknown_name_while_merged():
    m = _llama_with_modules_to_save_adapters()
    m.set_adapter("two")
    m.eval()
    with _quiet():
        m.merge_adapter()
    assert any(layer.merged_adapters for layer in m.modules() if hasattr(layer, "merged_adapters"))
    before = _out(m, "llama")
    snap = _full_snapshot(m)
    with _quiet():
        with pytest.raises(ValueError, match="nope"):
            m.set_adapter("nope")
        with pytest.raises(ValueError, match="nope"):
            m.set_adapter(["two", "nope"])
    _assert_untouched(m, snap)
    assert torch.equal(_out(m, "llama"), before)
