"""The `peft-fast` command line (peft_fast/cli*.py), run as a user runs it, on a tiny Llama saved in tmp_path, with
adapters written by peft_fast and by Hugging Face PEFT.

Importing peft_fast (PEFT and transformers with it) costs a child process several seconds here, so the commands
run in two children started at once, both with the test folder as cwd (so the repo root, whose `kernels/` folder
shadows Hugging Face's `kernels` package, is not on sys.path): a real `python -m peft_fast` run (the module entry
point, its output and exit code), and a driver that imports the CLI once and runs every other command line through
`peft_fast.cli.main(argv)`, recording each one's exit code, stdout and stderr. The outputs are then loaded here,
with transformers, peft_fast and PEFT, and compared with the adapters' own outputs.

The CLI is peft_fast's alone: the file is skipped when the suite runs against PEFT.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from tiny_models import peft_fast_only

pytestmark = peft_fast_only

DRIVER = r"""
import contextlib, io, json, sys
from peft_fast.cli import main

results = {}
for label, argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors and --help
            code = e.code
    results[label] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
with open(sys.argv[2], "w") as fh:
    json.dump(results, fh)
"""
IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))
# pyproject's [project.scripts]: installed beside the interpreter by `pip install -e .` (make setup)
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "peft-fast")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PEFT_FAST_BACKEND", "PYTHONPATH")}
    env["TRITON_INTERPRET"] = "1"
    return env


def _load_base(path, **kw):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, **kw)


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits.float()


def _build(root):
    """The base model and the adapter folders the commands read; returns the in-memory adapter models."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_fast

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                 pad_token_id=0)).save_pretrained(root / "base")
    torch.manual_seed(1)
    pf = peft_fast.get_peft_model(_load_base(root / "base"), peft_fast.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM"))
    pf.add_adapter("second", peft_fast.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], use_dora=True,
                                                  init_lora_weights=False))
    pf.save_pretrained(root / "pf")
    pf.save_pretrained(root / "pf_bin", safe_serialization=False, selected_adapters=["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp = peft.get_peft_model(_load_base(root / "base"), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"],
            rank_pattern={"v_proj": 2}, init_lora_weights=False, task_type="CAUSAL_LM"))
        pp.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["down_proj"], use_rslora=True,
                                                lora_bias=True, init_lora_weights=False))
        with torch.no_grad():  # a lora_bias starts at zero: make it count
            for n, p in pp.named_parameters():
                if "lora_B.other.bias" in n:
                    p.uniform_(-0.5, 0.5)
        pp.save_pretrained(root / "peft", safe_serialization=False)

    # Non-finite weights: one NaN, one inf, in a peft_fast file whose config copy still matches.
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(root / "pf", root / "nan", ignore=shutil.ignore_patterns("second"))
    path = str(root / "nan" / "adapter_model.safetensors")
    with safe_open(path, framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    keys = sorted(tensors)
    tensors[keys[0]][0, 0], tensors[keys[1]][0, 0] = float("nan"), float("inf")
    save_file(tensors, path, metadata=meta)
    # Weights from one save, adapter_config.json from another (here: lora_alpha changed afterwards).
    shutil.copytree(root / "pf", root / "interrupted", ignore=shutil.ignore_patterns("second"))
    cfg = json.loads((root / "interrupted" / "adapter_config.json").read_text())
    (root / "interrupted" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16}))
    # A truncated weights file.
    shutil.copytree(root / "pf", root / "corrupt", ignore=shutil.ignore_patterns("second"))
    with open(root / "corrupt" / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(os.path.getsize(root / "pf" / "adapter_model.safetensors") // 2)
    # Output folders already in use.
    (root / "occupied").mkdir()
    (root / "occupied" / "keep.txt").write_text("mine")
    (root / "conv_force").mkdir()
    (root / "conv_force" / "keep.txt").write_text("mine")
    shutil.copy(root / "peft" / "adapter_model.bin", root / "conv_force" / "adapter_model.bin")  # stale weights
    return pf, pp


def _commands(root):
    r = lambda name: str(root / name)  # noqa: E731
    return [
        ("inspect_pf", ["inspect", r("pf")]),
        ("inspect_pf_json", ["inspect", r("pf"), "--json"]),
        ("inspect_peft", ["inspect", r("peft")]),
        ("inspect_peft_json", ["inspect", r("peft"), "--json"]),
        ("inspect_pf_bin_json", ["inspect", r("pf_bin"), "--json"]),
        ("inspect_nan", ["inspect", r("nan")]),
        ("inspect_nan_json", ["inspect", r("nan"), "--json"]),
        ("inspect_interrupted", ["inspect", r("interrupted")]),
        ("inspect_corrupt_json", ["inspect", r("corrupt"), "--json"]),
        ("inspect_missing", ["inspect", r("missing")]),
        ("inspect_model_folder", ["inspect", r("base")]),
        ("merge_pf", ["merge", r("base"), r("pf"), r("merged_pf")]),
        ("merge_peft", ["merge", r("base"), r("peft"), r("merged_peft"), "--safe"]),
        ("merge_second", ["merge", r("base"), r("pf"), r("merged_second"), "--adapter-name", "second", "--dtype",
                          "bfloat16"]),
        ("merge_fails", ["merge", r("base"), r("peft"), r("m3"), "--adapter-name", "other"]),
        ("merge_no_such_adapter", ["merge", r("base"), r("peft"), r("m1"), "--adapter-name", "nope"]),
        ("merge_occupied", ["merge", r("base"), r("pf"), r("occupied")]),
        ("merge_missing_base", ["merge", r("nobase"), r("pf"), r("m2")]),
        ("quantize_nf4", ["quantize", r("base"), r("q_nf4")]),
        ("quantize_fp4", ["quantize", r("base"), r("q_fp4"), "--quant-type", "fp4", "--blocksize", "128",
                          "--no-double-quant", "--compute-dtype", "bfloat16"]),
        ("quantize_bad_blocksize", ["quantize", r("base"), r("q_bad"), "--blocksize", "100"]),
        ("convert_to_st", ["convert", r("peft"), r("conv_st")]),
        ("convert_to_bin", ["convert", r("pf"), r("conv_bin"), "--to", "bin"]),
        ("convert_force", ["convert", r("pf"), r("conv_force"), "--force"]),
        ("convert_occupied", ["convert", r("pf"), r("occupied")]),
        ("convert_interrupted", ["convert", r("interrupted"), r("conv_int")]),
        ("inspect_conv_bin_json", ["inspect", r("conv_bin"), "--json"]),
        ("bench_passthrough", ["bench", "--version"]),
        ("unknown_command", ["frobnicate"]),
    ]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pf, pp = _build(root)
    run = lambda argv: subprocess.Popen(argv, cwd=root, env=_env(), text=True,  # noqa: E731
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children = {
        "driver": run([sys.executable, "-c", DRIVER, json.dumps(_commands(root)), str(root / "results.json")]),
        "inspect": run([sys.executable, "-m", "peft_fast", "inspect", "nan"]),
        "script": run([str(CONSOLE_SCRIPT), "convert", "pf", "script_bin", "--to", "bin"]),
    }
    done = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=600)
        done[name] = {"code": child.returncode, "out": out, "err": err}
    assert done["driver"]["code"] == 0, done["driver"]["err"][-3000:]
    results = json.loads((root / "results.json").read_text())
    return {"root": root, "pf": pf, "pp": pp, "runs": done, **results}


def _ok(res):
    assert res["code"] == 0, res["err"]
    return res


def _error(res, code, *needles):
    assert res["code"] == code, res
    assert "Traceback" not in res["err"], res["err"]
    line = [ln for ln in res["err"].splitlines() if ln.startswith("error: ")]
    assert line, res["err"]
    for needle in needles:
        assert needle in line[-1], line[-1]


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


# --- merge ----------------------------------------------------------------------------------------------------
def test_merge_gives_the_adapter_models_outputs(ws):
    root, pf, pp = ws["root"], ws["pf"], ws["pp"]
    assert "saved to" in _ok(ws["merge_pf"])["out"]
    pf.set_adapter("default")
    merged = _load_base(root / "merged_pf")
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged), _logits(pf), atol=1e-5, rtol=1e-5)
    # PEFT's files: DoRA + modules_to_save, merged with --safe
    _ok(ws["merge_peft"])
    pp.set_adapter("default")
    torch.testing.assert_close(_logits(_load_base(root / "merged_peft")), _logits(pp), atol=1e-5, rtol=1e-5)


def test_merge_a_subfolder_adapter_in_bfloat16(ws):
    _ok(ws["merge_second"])
    merged = _load_base(ws["root"] / "merged_second", dtype="auto")
    assert merged.dtype == torch.bfloat16
    ws["pf"].set_adapter("second")
    torch.testing.assert_close(_logits(merged), _logits(ws["pf"]), atol=0.05, rtol=0.05)


def test_merge_errors(ws):
    _error(ws["merge_no_such_adapter"], 2, "nope is not an adapter folder", "other (pick one with --adapter-name)")
    _error(ws["merge_occupied"], 2, "occupied exists and is not empty", "--force")
    _error(ws["merge_missing_base"], 2, "nobase: no such model folder")
    # a failure of the merge itself: PEFT's lora_bias cannot merge into a layer without a bias
    _error(ws["merge_fails"], 1, "RuntimeError", "lora_bias=True")
    assert os.listdir(ws["root"] / "occupied") == ["keep.txt"]
    assert not any((ws["root"] / m).exists() for m in ("m1", "m2", "m3"))
    assert not [p for p in os.listdir(ws["root"]) if p.endswith(".tmp")]  # no staging folder left behind


# --- quantize -------------------------------------------------------------------------------------------------
def test_quantize_round_trip_without_bitsandbytes(ws):
    import peft_fast
    from peft_fast import load_quantized

    root = ws["root"]
    assert "quantized 14 linear layers" in _ok(ws["quantize_nf4"])["out"]
    cfg = json.loads((root / "q_nf4" / "config.json").read_text())["quantization_config"]
    assert cfg["bnb_4bit_quant_type"] == "nf4" and cfg["bnb_4bit_use_double_quant"]
    assert cfg["llm_int8_skip_modules"] == ["lm_head"]
    loaded = load_quantized(str(root / "q_nf4"))
    assert type(loaded.model.layers[0].self_attn.q_proj) is peft_fast.NF4Linear
    assert torch.equal(_logits(loaded), _logits(peft_fast.quantize(_load_base(root / "base"))))

    _ok(ws["quantize_fp4"])
    loaded = load_quantized(str(root / "q_fp4"))
    layer = loaded.model.layers[1].mlp.down_proj
    assert (layer.quant_type, layer.blocksize, layer.compute_dtype) == ("fp4", 128, torch.bfloat16)
    assert not layer.quant_state.nested
    ref = peft_fast.quantize(_load_base(root / "base"), quant_type="fp4", blocksize=128, double_quant=False,
                             compute_dtype=torch.bfloat16)
    assert torch.equal(_logits(loaded), _logits(ref))


def test_quantized_checkpoint_loads_with_transformers_and_bitsandbytes(ws, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    from peft_fast import load_quantized

    ours = load_quantized(str(ws["root"] / "q_nf4"))
    bnb = _load_base(ws["root"] / "q_nf4")
    layer = bnb.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "Linear4bit"
    assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                       ours.model.layers[1].mlp.down_proj.dequantize())
    # bitsandbytes' CPU layer computes in bf16 internally: same weights, bf16-rounded outputs
    torch.testing.assert_close(_logits(bnb), _logits(ours), atol=2e-2, rtol=2e-2)
    # load_quantized reads what transformers + bitsandbytes save, too: the same bytes, the same model
    from qlora_models import load4

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load4(ws["root"] / "base", (torch.float32, torch.float32, True, "nf4")).save_pretrained(tmp_path / "bnb")
    assert torch.equal(_logits(load_quantized(str(tmp_path / "bnb"))), _logits(ours))


# --- convert --------------------------------------------------------------------------------------------------
def _peft_fast_and_peft_outputs(base, folder, subfolder=None):
    import peft

    import peft_fast

    kw = {"subfolder": subfolder} if subfolder else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = peft_fast.PeftModel.from_pretrained(_load_base(base), str(folder), **kw)
        theirs = peft.PeftModel.from_pretrained(_load_base(base), str(folder), **kw)
    return _logits(ours), _logits(theirs)


def test_convert_bin_to_safetensors(ws):
    root, pp = ws["root"], ws["pp"]
    assert "default: adapter_model.bin ->" in _ok(ws["convert_to_st"])["out"]
    assert sorted(os.listdir(root / "conv_st")) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    config = (root / "peft" / "adapter_config.json").read_bytes()
    assert (root / "conv_st" / "adapter_config.json").read_bytes() == config
    for name in ("default", "other"):
        pp.set_adapter(name)
        ours, theirs = _peft_fast_and_peft_outputs(root / "base", root / "conv_st", None if name == "default" else name)
        torch.testing.assert_close(ours, _logits(pp), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs, _logits(pp), atol=1e-5, rtol=1e-5)


def test_convert_safetensors_to_bin(ws):
    root, pf = ws["root"], ws["pf"]
    _ok(ws["convert_to_bin"])
    assert sorted(os.listdir(root / "conv_bin")) == ["adapter_config.json", "adapter_model.bin", "second"]
    assert sorted(os.listdir(root / "conv_bin" / "second")) == ["adapter_config.json", "adapter_model.bin"]
    pf.set_adapter("default")
    ours, theirs = _peft_fast_and_peft_outputs(root / "base", root / "conv_bin")
    torch.testing.assert_close(ours, _logits(pf), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, _logits(pf), atol=1e-5, rtol=1e-5)


def test_convert_output_folder_rules(ws):
    root = ws["root"]
    _ok(ws["convert_force"])  # --force: the stale .bin, which loading would not read first but PEFT might, is gone
    assert sorted(os.listdir(root / "conv_force")) == ["adapter_config.json", "adapter_model.safetensors", "keep.txt",
                                                       "second"]
    _error(ws["convert_occupied"], 2, "occupied exists and is not empty")
    _error(ws["convert_interrupted"], 1, "InterruptedSaveError", "interrupted")
    assert not (root / "conv_int").exists()


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
