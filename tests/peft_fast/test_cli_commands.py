"""`peft-fast`: python -m, the console script, usage errors, inspect, help and bench. The folders and the runs
of every command are built once: tests/helpers/cli_workspace.py."""
import json
import os
import sys

import pytest

from cli_workspace import CONSOLE_SCRIPT, IDS, _error, _load_base, _logits, _ok  # noqa: F401
from tiny_models import peft_fast_only

pytestmark = peft_fast_only

# --- python -m peft_fast --------------------------------------------------------------------------------------
def test_python_m_runs_a_command(ws):
    res = ws["runs"]["inspect"]
    assert res["code"] == 1, res["err"]  # the exit code of a report with a problem reaches the shell
    assert res["out"].startswith(f"{ws['root'] / 'nan'}: 1 adapter\n") and "1 problem found" in res["out"]
    assert "Traceback" not in res["err"]


def test_console_script_runs_a_command(ws):
    res = ws["runs"]["script"]
    assert res["code"] == 0, res["err"]
    assert sorted(os.listdir(ws["root"] / "script_bin")) == sorted(
        n.replace("adapter_model.safetensors", "adapter_model.bin") for n in os.listdir(ws["root"] / "pf")
        if n != "README.md")


def test_python_m_drops_the_current_directory_from_sys_path(tmp_path, monkeypatch):
    import importlib

    import peft_fast.__main__ as entry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])  # what `python -m` does
    importlib.reload(entry)
    assert str(tmp_path) not in sys.path


def test_usage_errors_exit_2(ws):
    _error(ws["quantize_bad_blocksize"], 2, "--blocksize", "invalid choice")
    _error(ws["unknown_command"], 2, "frobnicate")


# --- inspect --------------------------------------------------------------------------------------------------
def test_inspect_json_peft_fast_adapter(ws):
    report = json.loads(_ok(ws["inspect_pf_json"])["out"])
    assert report["ok"] and [a["name"] for a in report["adapters"]] == ["default", "second"]
    d, s = report["adapters"]
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM" and d["r"] == 4 and d["lora_alpha"] == 8
    assert d["scaling"] == 2.0 and d["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert d["targets_found"] == 6 and d["target_layers"] == {"down_proj": 2, "q_proj": 2, "v_proj": 2}
    assert d["tensors"] == 12 and d["parameters"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4 + 4 * 128 + 64 * 4)
    assert d["dtypes"] == {"float32": 12} and d["nonfinite"] == [] and d["problems"] == []
    assert d["base_model"] == str(ws["root"] / "base") and d["saved_by"].startswith("peft_fast-")
    assert d["config_copy"] == "matches" and d["weights_file"] == "adapter_model.safetensors"
    assert d["files"]["adapter_model.safetensors"] == os.path.getsize(ws["root"] / "pf" / "adapter_model.safetensors")
    assert s["use_dora"] and not s["use_rslora"] and s["targets_found"] == 2 and s["path"].endswith("second")


def test_inspect_peft_written_bin_folder(ws):
    report = json.loads(_ok(ws["inspect_peft_json"])["out"])
    d, o = report["adapters"]
    assert (d["name"], o["name"]) == ("default", "other") and d["weights_file"] == "adapter_model.bin"
    assert d["use_dora"] and d["rank_pattern"] == {"v_proj": 2} and d["modules_to_save"] == ["lm_head"]
    assert d["tensor_kinds"] == {"adapter": 12, "modules_to_save": 1} and d["config_copy"] is None
    assert o["use_rslora"] and o["lora_bias"] and o["scaling"] == pytest.approx(8 / 2 ** 0.5)
    assert o["task_type"] is None and o["saved_by"] == d["saved_by"] and not d["saved_by"].startswith("peft_fast")
    text = _ok(ws["inspect_peft"])["out"]
    for line in ("DoRA yes", "rank_pattern {\"v_proj\": 2}", "modules_to_save   lm_head", "saved by          PEFT",
                 "rsLoRA yes, lora_bias yes", "adapted modules   4: q_proj x2, v_proj x2"):
        assert line in text, text
    # .bin written by peft_fast's save_pretrained, and by convert
    for label in ("inspect_pf_bin_json", "inspect_conv_bin_json"):
        a = json.loads(_ok(ws[label])["out"])["adapters"][0]
        assert a["weights_file"] == "adapter_model.bin" and a["tensors"] == 12 and a["config_copy"] is None


def test_inspect_reports_non_finite_tensors(ws):
    res = ws["inspect_nan_json"]
    assert res["code"] == 1
    a = json.loads(res["out"])["adapters"][0]
    assert [(b["nan"], b["inf"]) for b in a["nonfinite"]] == [(1, 0), (0, 1)]
    assert "2 of 12 tensors are not finite" in a["problems"][0] and a["config_copy"] == "matches"
    text = ws["inspect_nan"]
    assert text["code"] == 1 and "finite            NO: 2 tensor(s)" in text["out"] and "1 problem found" in text["out"]


def test_inspect_reports_an_interrupted_save(ws):
    res = ws["inspect_interrupted"]
    assert res["code"] == 1 and "problem: interrupted save:" in res["out"] and "lora_alpha" in res["out"]
    assert "DIFFERS" in res["out"]


def test_inspect_text_peft_fast_adapter(ws):
    text = _ok(ws["inspect_pf"])["out"].splitlines()
    assert text[0] == f"{ws['root'] / 'pf'}: 2 adapters" and text[-1] == "OK"
    split = text.index(f"adapter 'second' ({ws['root'] / 'pf' / 'second'})")
    default, second = text[:split], text[split:]
    assert f"adapter 'default' ({ws['root'] / 'pf'})" in default
    for line in ("rank              r=4", "alpha             8 (scaling 2)", "finite            yes, every tensor",
                 "adapted modules   6: down_proj x2, q_proj x2, v_proj x2", "dtypes            float32 x12",
                 "targets           down_proj, q_proj, v_proj", "modules_to_save   none",
                 "options           DoRA no, rsLoRA no, lora_bias no, bias none, dropout 0.0",
                 "tensors           12 (12 adapter), 3,328 parameters", "saved by          peft_fast 0.1.0",
                 "config check      the config saved inside the weights matches adapter_config.json"):
        assert "  " + line in default, "\n".join(text)
    for line in ("rank              r=2", "alpha             4 (scaling 2)", "task none",
                 "options           DoRA yes, rsLoRA no, lora_bias no, bias none, dropout 0.0"):
        assert any(line in ln for ln in second), "\n".join(text)


def test_inspect_reports_an_unreadable_weights_file(ws):
    res = ws["inspect_corrupt_json"]
    assert res["code"] == 1
    (a,) = json.loads(res["out"])["adapters"]
    assert "adapter_model.safetensors cannot be read" in a["problems"][0] and a["r"] == 4


def test_inspect_refuses_what_is_not_an_adapter_folder(ws):
    _error(ws["inspect_missing"], 2, "missing: no such folder")
    _error(ws["inspect_model_folder"], 2, "is not an adapter folder", "looks like a model folder")


# --- help and bench -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["", "inspect", "merge", "quantize", "convert", "bench"])
def test_help(command, capsys):
    from peft_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: peft-fast" + (f" {command}" if command else ""))


def test_bench_passes_arguments_to_pytest(ws):
    assert ws["bench_passthrough"]["code"] == 0  # `pytest bench/ --version` ran (its output is the child's)


def test_bench_without_a_source_checkout(tmp_path, monkeypatch, capsys):
    from peft_fast import cli

    monkeypatch.setattr(cli, "bench_dir", lambda: tmp_path / "bench")
    assert cli.main(["bench", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no benchmarks here:") and "wheel" in err
