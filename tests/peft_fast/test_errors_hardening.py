"""Hardening beyond PEFT: adapter names that could escape the save directory or shadow "__base__", config and
weights files from two different saves, reloads that fail halfway, configs of the wrong types, a model left with no
active adapter, loose arguments, non-finite adapter weights. Each case asserts a clear error (or warning) and a
model and directory left as they were."""
import json
import os
import random
import signal
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import AGAINST_PEFT, TinyMLP, assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast-only guarantees")

import peft_fast  # noqa: E402
from peft_fast import LoraConfig, PeftModel  # noqa: E402
from peft_fast.files import InterruptedSaveError  # noqa: E402


def _base():
    torch.manual_seed(0)
    return TinyMLP()


def _cfg(**kw):
    return LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": False, **kw})


def _model(**kw):
    torch.manual_seed(1)
    return peft_fast.get_peft_model(_base(), _cfg(**kw))


def _x():
    return torch.randn(3, 16, generator=torch.Generator().manual_seed(2))


def _tree(path) -> dict:
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(path) for f in fs} if os.path.exists(path) else {}


# ------------------------------------------------------------------------------------------------ 1. adapter names
BAD_NAMES = [os.path.abspath("ESCAPE"), "sub/dir", "..", "a.b", "__base__", "", "back\\slash"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("entry", ["get_peft_model", "add_adapter", "load_adapter", "from_pretrained",
                                   "add_weighted_adapter"])
def test_names_that_escape_or_shadow_are_refused(entry, name, tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "saved")
    snap = snapshot(model)
    calls = {
        "get_peft_model": lambda: peft_fast.get_peft_model(base, _cfg(), adapter_name=name),
        "add_adapter": lambda: model.add_adapter(name, _cfg()),
        "load_adapter": lambda: model.load_adapter(str(tmp_path / "saved"), adapter_name=name),
        "from_pretrained": lambda: PeftModel.from_pretrained(base, str(tmp_path / "saved"), adapter_name=name),
        "add_weighted_adapter": lambda: model.add_weighted_adapter(["default"], [1.0], name, "linear"),
    }
    base = _base()
    with pytest.raises(ValueError, match="Invalid adapter name"):
        calls[entry]()
    assert_unchanged(model, snap)
    assert all(type(m).__name__ in ("Linear", "ReLU", "LayerNorm", "TinyMLP") for m in base.modules())
    assert not os.path.exists(os.path.abspath("ESCAPE"))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_save_pretrained_refuses_such_names_and_writes_nothing(name, tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.save_pretrained(tmp_path / "out", selected_adapters=[name])
    assert not (tmp_path / "out").exists() and not os.path.exists(os.path.abspath("ESCAPE"))


def test_non_string_names_are_a_type_error():
    model = _model()
    with pytest.raises(TypeError, match="must be a str"):
        model.add_adapter(3, _cfg())


# ------------------------------------------------------------------------------------------------ 2. interrupted saves
def _other():
    torch.manual_seed(7)
    return peft_fast.get_peft_model(_base(), _cfg(lora_alpha=32))


def _mix(tmp_path):
    """A folder with one save's config and another save's weights: what a save killed between its renames leaves."""
    old, new = tmp_path / "old", tmp_path / "new"
    _model().save_pretrained(old)
    _other().save_pretrained(new)
    os.replace(new / "adapter_model.safetensors", old / "adapter_model.safetensors")
    return old


def test_a_pair_from_two_saves_is_refused_as_an_interrupted_save(tmp_path):
    folder = _mix(tmp_path)
    base = _base()
    with pytest.raises(InterruptedSaveError, match="interrupted") as info:
        PeftModel.from_pretrained(base, str(folder))
    assert "lora_alpha" in str(info.value)
    assert all(type(m).__name__ != "LoraLinear" for m in base.modules())
    model = _model()
    model.add_adapter("other", _cfg())
    snap = snapshot(model)
    with pytest.raises(InterruptedSaveError):
        model.load_adapter(str(folder), adapter_name="third")
    assert_unchanged(model, snap)


def test_a_computation_key_deleted_from_the_config_is_refused_as_an_interrupted_save(tmp_path):
    """A key missing from adapter_config.json falls back to its default (lora_alpha 8 here, saved as 4): compared
    with the config saved beside the weights, that changes the math like any other edit."""
    _model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InterruptedSaveError, match="lora_alpha"):
        PeftModel.from_pretrained(_base(), str(tmp_path))


def test_a_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """A write that fails (a full disk) halfway through the weights: the previous pair stays, no temp file left."""
    import safetensors.torch

    _model().save_pretrained(tmp_path)
    before = _tree(tmp_path)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        _model(lora_alpha=32).save_pretrained(tmp_path)
    assert _tree(tmp_path) == before


def test_missing_and_truncated_weights_are_named(tmp_path):
    """The error names the file looked for (safetensors first, not the .bin fallback) or the file that is cut."""
    _model().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    base = _base()
    snap = snapshot(base)
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        PeftModel.from_pretrained(base, str(tmp_path))
    assert str(weights) in str(info.value)
    assert_unchanged(base, snap)
    os.remove(weights)
    with pytest.raises(FileNotFoundError) as info:
        PeftModel.from_pretrained(base, str(tmp_path))
    assert "adapter_model.safetensors" in str(info.value) and str(tmp_path) in str(info.value)
    assert_unchanged(base, snap)


def test_loading_leaves_the_callers_config_as_it_was(tmp_path):
    _model().save_pretrained(tmp_path)
    cfg = _cfg()
    loaded = PeftModel.from_pretrained(_base(), str(tmp_path), config=cfg)
    assert cfg.inference_mode is False and loaded.peft_config["default"] is not cfg
    assert loaded.peft_config["default"].inference_mode


def test_edits_that_do_not_change_the_math_still_load_and_peft_files_load(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(base_model_name_or_path="/moved/elsewhere", inference_mode=False)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = PeftModel.from_pretrained(_base(), str(tmp_path))
    torch.testing.assert_close(loaded(_x()), model.eval()(_x()))
    weights = tmp_path / "adapter_model.safetensors"  # as PEFT writes it: no config copy inside
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    cfg["lora_alpha"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    assert PeftModel.from_pretrained(_base(), str(tmp_path)).peft_config["default"].lora_alpha == 8


def test_leftover_temp_files_are_cleaned_and_files_get_the_usual_permissions(tmp_path):
    pid = os.fork() if hasattr(os, "fork") else pytest.skip("needs fork")
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # now a pid that no process has
    dead = tmp_path / f".adapter_model.safetensors.{pid}.abc123.tmp"
    live = tmp_path / f".adapter_config.json.{os.getppid()}.def456.tmp"  # a running writer's: kept
    dead.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    old_umask = os.umask(0o022)
    try:
        _model().save_pretrained(tmp_path)
    finally:
        os.umask(old_umask)
    assert not dead.exists() and live.exists()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name


def _saver(folder, stop_after=None):
    """The child's loop: two adapters with different scalings and weights saved in turn into one folder."""
    models = [_model(), _other()]
    i = 0
    while stop_after is None or i < stop_after:
        models[i % 2].save_pretrained(folder)
        i += 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked writer")
def test_killing_repeated_saves_never_leaves_a_silent_mix(tmp_path):
    """A writer killed at random moments: every folder it leaves loads as one of the two adapters, or is refused as
    an interrupted save; never new weights with the other adapter's config."""
    folder = tmp_path / "adapter"
    _saver(folder, stop_after=1)
    want = {4: _model().eval()(_x()).detach(), 32: _other().eval()(_x()).detach()}  # by lora_alpha
    rng, outcomes = random.Random(0), []
    for _ in range(25):
        pid = os.fork()
        if pid == 0:  # the child saves until it is killed
            try:
                _saver(folder)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = PeftModel.from_pretrained(_base(), str(folder))
        except InterruptedSaveError:
            outcomes.append("refused")
            continue
        alpha = loaded.peft_config["default"].lora_alpha
        torch.testing.assert_close(loaded(_x()), want[alpha], rtol=0, atol=0)  # config and weights of one save
        outcomes.append(f"loaded alpha={alpha}")
    # seen here: about 40% refused, the rest loaded as one adapter or the other
    assert len(outcomes) == 25 and all(o in ("refused", "loaded alpha=4", "loaded alpha=32") for o in outcomes)
    _saver(folder, stop_after=1)  # the next save cleans what the killed writers left
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ 3. reloads
@pytest.mark.parametrize("fault", ["sparse", "missing"])
def test_reloading_over_an_adapter_is_all_or_nothing(fault, tmp_path):
    """A file whose last layer's tensor is unusable (sparse) or absent: lin0's tensors come first and would already
    be copied; none are. PEFT warns about a missing key and keeps that tensor's old value."""
    model = _model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    tensors = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    key = "base_model.model.lin1.lora_B.weight"
    if fault == "sparse":
        tensors[key] = tensors[key].to_sparse()
    else:
        del tensors[key]
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0) if p.requires_grad else None  # the model differs from the file everywhere
    snap = snapshot(model)
    with pytest.raises(ValueError, match="sparse" if fault == "sparse" else r"missing, e\.g\. .*lin1\.lora_B"):
        model.load_adapter(str(tmp_path), adapter_name="default")
    assert_unchanged(model, snap)
    if fault == "missing":  # and a new adapter from that file is not made either
        base = _base()
        with pytest.raises(ValueError, match="missing"):
            PeftModel.from_pretrained(base, str(tmp_path))
        assert all(type(m).__name__ != "LoraLinear" for m in base.modules())


def test_a_copy_failing_midway_puts_back_what_was_copied(tmp_path, monkeypatch):
    model = _model()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0) if p.requires_grad else None
    snap = snapshot(model)
    calls, real = [], torch.Tensor.copy_

    def failing_copy(self, src, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device went away")
        return real(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError, match="went away"):
        model.load_adapter(str(tmp_path), adapter_name="default")
    monkeypatch.setattr(torch.Tensor, "copy_", real)
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------------ 4. configs
BAD_FIELDS = [("use_rslora", "false"), ("lora_alpha", None), ("lora_alpha", "8"), ("alpha_pattern", {"lin0": None}),
              ("rank_pattern", {"lin0": 0}), ("lora_dropout", "0.1"), ("fan_in_fan_out", 1),
              ("layers_to_transform", "1"), ("target_modules", 5), ("use_dora", "yes")]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_config_fields_of_the_wrong_type_or_range_are_named(field, value, tmp_path):
    kw = {"target_modules": ["lin0"], field: value}
    with pytest.raises((ValueError, TypeError), match=field) as info:
        LoraConfig(**kw)
    assert repr(value) in str(info.value)
    _model().save_pretrained(tmp_path)  # the same value in a file: refused naming the file, the field and value
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    base = _base()
    with pytest.raises((ValueError, TypeError), match=field) as info:
        PeftModel.from_pretrained(base, str(tmp_path))
    assert "adapter_config.json" in str(info.value)


# ------------------------------------------------------------------------------------------------ 5. no active adapter
def test_set_adapter_with_no_name_is_refused():
    model = _model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="at least one adapter"):
        model.set_adapter([])
    assert_unchanged(model, snap)


def test_deleting_the_last_adapter_warns_and_the_next_adapter_is_active():
    model = _model()
    with pytest.warns(UserWarning, match="none is active"):
        model.delete_adapter("default")
    assert model.active_adapters == []
    model.add_adapter("next", _cfg())
    assert model.active_adapters == ["next"]
    with torch.no_grad(), model.disable_adapter():
        base_out = model(_x())
    assert not torch.allclose(model(_x()), base_out)


# ------------------------------------------------------------------------------------------------ 6. arguments
@pytest.mark.parametrize("kw,match", [({"density": 1.5, "combination_type": "ties"}, "density"),
                                      ({"svd_rank": 0}, "svd_rank"),
                                      ({"weights": [float("nan")]}, "finite"),
                                      ({"adapter_name": "default"}, "already exists")])
def test_add_weighted_adapter_arguments(kw, match):
    model = _model()
    snap = snapshot(model)
    args = {"adapters": ["default"], "weights": [1.0], "adapter_name": "merged", "combination_type": "svd", **kw}
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(**args)
    assert_unchanged(model, snap)


def test_merge_adapter_with_a_string_says_to_pass_a_list():
    model = _model()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"\['default'\]"):
        model.merge_adapter(adapter_names="default")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bad", [None, 1])
def test_adapter_names_that_are_not_strings(bad):
    model = _model().eval()
    with pytest.raises(TypeError, match="position 1"):
        model(_x(), adapter_names=["default", bad, "__base__"])


# ------------------------------------------------------------------------------------------------ 7. non-finite weights
def test_non_finite_adapter_weights_load_with_a_warning_and_safe_merge_refuses_them(tmp_path):
    model = _model()
    with torch.no_grad():
        model.base_model.model.lin1.lora_A["default"].weight[0, 0] = float("inf")  # inf == inf: snapshots compare
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="NaN or inf") as caught:
        loaded = PeftModel.from_pretrained(_base(), str(tmp_path))
    assert sum("NaN or inf" in str(w.message) for w in caught) == 1  # once per adapter
    snap = snapshot(loaded)
    with pytest.raises(ValueError, match="NaN"):
        loaded.merge_adapter(safe_merge=True)
    assert_unchanged(loaded, snap)


# ------------------------------------------------------------------------------------ found by probes (PEFT's rules)
def test_modules_to_save_naming_an_adapted_module_is_refused_and_changes_nothing():
    """PEFT raises TypeError (after adding half the adapter). Wrapping the adapted layer would move the other
    adapter's parameters under `original_module` and write files neither library loads."""
    model = _model()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"modules_to_save cannot be applied.*lin1"):
        model.add_adapter("full", _cfg(target_modules=["lin0"], modules_to_save=["lin1"]))
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]


def test_pattern_keys_matching_no_target_warn_as_in_peft():
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys did not match any targeted module.*'lin9'"):
        _model(rank_pattern={"lin9": 4, "lin0": 3})
    with pytest.warns(RuntimeWarning, match=r"alpha_pattern keys did not match any targeted module.*'zz'"):
        _model(alpha_pattern={"zz": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _model(rank_pattern={"lin0": 3}, alpha_pattern={"lin1": 2})  # every key matches: silent


def test_float8_adapter_files_load_as_in_peft(tmp_path):
    """torch has no isfinite for float8: the non-finite check reads such tensors in float32."""
    model = _model()
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(_base(), str(tmp_path), config=model.peft_config["default"])
    for k, v in loaded.state_dict().items():
        if "lora_" in k:
            assert torch.equal(v, model.state_dict()[k].to(torch.float8_e4m3fn).float()), k


def test_two_threads_saving_into_one_folder_leave_one_whole_adapter(tmp_path):
    """Each file is written atomically; the pair is written under a lock per folder, so the folder ends up holding
    one save's weights with that save's config, never one's weights beside the other's config."""
    import threading

    models = [_model(lora_alpha=4), _model(lora_alpha=8)]
    folder = str(tmp_path / "shared")
    for _ in range(12):
        barrier, errors = threading.Barrier(2), []

        def save(m):
            try:
                barrier.wait()
                m.save_pretrained(folder)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        loaded = PeftModel.from_pretrained(_base(), folder)  # an interrupted pair would be refused here
        assert loaded.peft_config["default"].lora_alpha in (4, 8)
