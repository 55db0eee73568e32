"""The workspace of the `peft-fast` command-line tests (test_cli_*.py): the command line run as a user runs it, on
a tiny Llama saved in a temp folder, with adapters written by peft_fast and by Hugging Face PEFT.

Importing peft_fast (PEFT and transformers with it) costs a child process several seconds here, so the commands
run in three children started at once, all with the test folder as cwd (so the repo root, whose `kernels/` folder
shadows Hugging Face's `kernels` package, is not on sys.path): a real `python -m peft_fast` run (the module entry
point, its output and exit code), one of the `peft-fast` console script, and a driver that imports the CLI once
and runs every other command line through `peft_fast.cli.main(argv)`, recording each one's exit code, stdout and
stderr. The tests then load the outputs with transformers, peft_fast and PEFT and compare them with the adapters'
own outputs. tests/peft_fast/conftest.py
builds the workspace once per session (fixture `ws`); the CLI is peft_fast's alone, so those tests are skipped
when the suite runs against PEFT.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings

import torch

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
        ("quantize_bf16store", ["quantize", r("base"), r("q_bf16store"), "--quant-storage", "bfloat16"]),
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


def make_workspace(root):
    """Build the folders, run every command (in two children at once) and return what they did."""
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


