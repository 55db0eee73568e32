"""The cached launch path against Triton's dispatcher on a stand-in sm_90 GPU (tests/helpers/launch_worker.py, in a
subprocess: the kernels must be compiled there, while this session runs them under the interpreter).

Every op's launches from the cache must be the ones the dispatcher makes (the same compiled kernel, grid, stream
and arguments) with no dispatcher call once warm; whatever makes Triton compile another specialization must miss
the cache; profiler hooks, PEFT_FAST_LAUNCH=jit and stand-ins keep the dispatcher. The same worker passes with the
GPU machine's Triton 3.6 (`PYTHONPATH=<unpacked triton 3.6 wheel> python tests/helpers/launch_worker.py OUT`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_fast.kernels import HAS_TRITON

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "launch_worker.py"
CHECKS = ["verified triton"] + ["same as dispatcher: " + op for op in (
    "lora", "lora dropout", "lora decode", "dora", "dora dropout", "dora norm", "multi-lora fused",
    "multi-lora shrink+expand", "grouped", "nf4")]
CHECKS += ["scalar types", "dtypes and alignment", "keyword orders", "triton switches", "hook kinds", "changed global",
           "bounded cache, callable grid"]
CHECKS += ["respecializes", "device and stream", "hooks", "jit setting", "layouts", "stand-in"]

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton's compiler")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFT_FAST_BACKEND")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], cwd=out, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def test_every_check_ran(results):
    assert sorted(results) == sorted(CHECKS)


@pytest.mark.parametrize("check", CHECKS)
def test_launch(results, check):
    assert results[check] is None, results[check]
