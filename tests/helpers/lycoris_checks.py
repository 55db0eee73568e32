"""Parity checks that LoHa and LoKr share, each run by both parity files with the tuner's own configs: files both
ways, merging, several adapters, mixed batches, bf16 bases, refusals that leave the model as it was."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from lycoris_pairs import TUNERS, add_both, assert_same_files, cfg, pair, x_for
from tiny_models import assert_close, assert_same_state, assert_unchanged, base_model, impl, out, ref, set_active, \
    snapshot


def check_files_both_ways(tuner: str, tmp_path, first: dict, second: dict) -> None:
    """Two adapters saved by each library: the same files; each library loads the other's with equal outputs."""
    _, r, i = pair(tuner, "llama", **first)
    add_both(tuner, r, i, "second", "llama", seed=2, **second)
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
    for src in ("ref", "impl"):  # PEFT's files into the implementation, and the implementation's into PEFT
        for lib in (impl, ref):
            loaded = lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / src))
            loaded.load_adapter(str(tmp_path / src / "second"), adapter_name="second")
            assert not loaded.training
            assert type(loaded.peft_config["second"]) is type(loaded.peft_config["default"])
            with torch.no_grad():
                assert_close(out(loaded, x), want["default"], msg=f"{src} -> {lib.__name__}")
                loaded.set_adapter("second")
                assert_close(out(loaded, x), want["second"], msg=f"{src} -> {lib.__name__}")


def check_merge_cycle(tuner: str, first: dict, second: dict) -> None:
    """merge_adapter / unmerge_adapter / safe merges / merge_and_unload of a chosen adapter / unload: PEFT's base
    weights after each, and the adapters' outputs throughout."""
    _, r, i = pair(tuner, "llama", **first)
    add_both(tuner, r, i, "other", "llama", seed=1, **second)
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        want = out(r, x)
        for m in (r, i):
            m.merge_adapter()
        assert_same_state(r, i)  # the merged base weights are PEFT's
        assert_close(out(i, x), want)
        assert any(layer.merged for _, layer in i.base_model.named_modules() if hasattr(layer, "merged_adapters"))
        for m in (r, i):
            m.unmerge_adapter()
        assert_same_state(r, i)
        assert_close(out(i, x), want)
        for m in (r, i):
            m.merge_adapter()
        with r.disable_adapter(), i.disable_adapter():  # a forward without adapters unmerges first, as in PEFT
            assert_close(out(i, x), out(r, x))
            assert_close(out(i, x), base_model("llama")(**x).logits)
        assert_same_state(r, i)
        assert not any(getattr(m, "merged", False) for m in i.modules())
        for m in (r, i):
            m.merge_adapter(adapter_names=["default", "other"], safe_merge=True)
        assert_same_state(r, i)
        for m in (r, i):
            m.unmerge_adapter()
        merged_r = r.merge_and_unload(adapter_names=["other"], safe_merge=True)
        merged_i = i.merge_and_unload(adapter_names=["other"], safe_merge=True)
        assert not any(hasattr(m, "merged_adapters") for m in merged_i.modules())
        assert_same_state(merged_r, merged_i)
        assert_close(merged_i(**x).logits, merged_r(**x).logits)
    _, r, i = pair(tuner, "mlp")
    plain = i.unload()
    assert type(plain.lin0) is torch.nn.Linear
    torch.testing.assert_close(plain.lin0.weight, base_model("mlp").lin0.weight, atol=0, rtol=0)


def check_several_adapters(tuner: str, second: dict, model_type: str) -> None:
    """set_adapter (one, then two active), disable_adapter, delete_adapter, layer and model status."""
    _, r, i = pair(tuner, "llama")
    add_both(tuner, r, i, "b", "llama", seed=1, **second)
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        for active in ("b", ["default", "b"], "default"):
            set_active(r, active)
            set_active(i, active)
            assert_close(out(i, x), out(r, x), msg=str(active))
            assert i.active_adapters == r.active_adapters
        with i.disable_adapter(), r.disable_adapter():
            assert_close(out(i, x), out(r, x))
            assert_close(out(i, x), base_model("llama")(**x).logits)
        for m in (r, i):
            m.set_adapter("b")
            m.delete_adapter("default")
        assert i.active_adapters == r.active_adapters == ["b"]
        assert set(i.peft_config) == set(r.peft_config) == {"b"}
        assert_same_state(r, i)
        assert_close(out(i, x), out(r, x))
    assert [s.module_type for s in i.get_layer_status()] == [s.module_type for s in r.get_layer_status()]
    assert i.get_model_status().adapter_model_type == r.get_model_status().adapter_model_type == model_type


def check_bf16_base(tuner: str, **overrides) -> None:
    """A bf16 base: PEFT's dtypes (factors float32 after the autocast, or bf16 without it), PEFT's initial values
    (drawn in float32, rounded through bf16), and its outputs to bf16 rounding (peft_fast applies ΔW in bf16 here,
    18 tokens and a cached ΔW, where PEFT casts x up to float32)."""
    base = base_model("llama").to(torch.bfloat16)
    ref_cls, impl_cls = TUNERS[tuner]
    for autocast in (True, False):
        kw = cfg("llama", **overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            r = ref.get_peft_model(copy.deepcopy(base), ref_cls(**kw), autocast_adapter_dtype=autocast)
            torch.manual_seed(0)
            i = impl.get_peft_model(copy.deepcopy(base), impl_cls(**kw), autocast_adapter_dtype=autocast)
        assert {n: p.dtype for n, p in i.named_parameters()} == {n: p.dtype for n, p in r.named_parameters()}
        assert_same_state(r, i, atol=0, rtol=0)
        x = x_for("llama")
        for model in (r, i):
            model.eval()
        with torch.no_grad():
            assert_close(out(i, x).float(), out(r, x).float(), atol=3e-2, rtol=3e-2)


def check_mixed_batch(tuner: str, second: dict) -> None:
    """Each sample of a mixed batch gets the adapter it names ("__base__": none), as a batch of its own through
    PEFT with that adapter active would; PEFT itself ignores `adapter_names` for this tuner."""
    _, r, i = pair(tuner, "llama")
    add_both(tuner, r, i, "b", "llama", seed=1, **second)
    x = x_for("llama", batch=3)
    names = ["b", "__base__", "default"]
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        mixed = out(i, x, adapter_names=names)
        for row, name in enumerate(names):
            one = {"input_ids": x["input_ids"][row:row + 1]}
            if name == "__base__":
                with r.disable_adapter():
                    want = out(r, one)
            else:
                r.set_adapter(name)
                want = out(r, one)
            assert_close(mixed[row:row + 1], want, msg=name)
        r.set_adapter("default")
        assert_close(out(r, x, adapter_names=names), out(r, x))  # PEFT: the names are ignored
    with pytest.raises(ValueError, match="training mode"):
        i.train()(**x, adapter_names=names)


def check_refused_changes(tuner: str, tmp_path) -> None:
    """A refused add (a bad rank in rank_pattern, found at the second layer) or load (a file whose shapes do not
    fit the adapter it would overwrite) changes nothing. PEFT leaves the first layer's new adapter behind."""
    impl_cls = TUNERS[tuner][1]
    _, _, i = pair(tuner, "mlp")
    snap = snapshot(i)
    with pytest.raises(ValueError, match="positive integer"):
        i.add_adapter("bad", impl_cls(target_modules=["lin0", "lin1"], rank_pattern={"lin1": 0}))
    assert_unchanged(i, snap)
    with torch.no_grad():
        getattr(i.base_model.model.lin1, i.base_model.model.lin1.adapter_layer_names[0])["default"].fill_(float("inf"))
    snap = snapshot(i)
    with pytest.raises(ValueError, match="NaN"):  # lin0 would merge; lin1 is broken: neither is merged
        i.merge_adapter(safe_merge=True)
    assert_unchanged(i, snap)
    _, _, other = pair(tuner, "mlp", r=2)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not fit"):
        i.load_adapter(str(tmp_path), adapter_name="default")  # other factor shapes into the existing adapter
    assert_unchanged(i, snap)
    check_4bit_refused(tuner, tmp_path)


def check_4bit_refused(tuner: str, tmp_path) -> None:
    """PEFT 0.21.2 builds the adapter on a bitsandbytes 4-bit layer (an nn.Linear) from the packed weight's shape
    and then fails in forward; peft_fast refuses 4-bit bases (bitsandbytes' and its own NF4Linear) before changing
    anything."""
    from qlora_models import CASES, load4, save_tiny_llama

    ref_cls, impl_cls = TUNERS[tuner]
    path = save_tiny_llama(tmp_path / "tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broken = ref.get_peft_model(load4(path, CASES[0]), ref_cls(target_modules=["q_proj"]))
    with pytest.raises(RuntimeError):
        broken(input_ids=torch.ones(1, 4, dtype=torch.long))
    for model in (load4(path, CASES[0]), impl.quantize(base_model("llama"))):
        snap = snapshot(model)
        with pytest.raises(TypeError, match="4-bit"):
            impl.get_peft_model(model, impl_cls(target_modules=["q_proj"]))
        assert_unchanged(model, snap)
