"""examples/serve_adapters.py as a user runs it: a stream of requests, each naming its adapter, served in mixed
batches by generate(); peft_fast's tokens equal Hugging Face PEFT's (the script exits 1 otherwise)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import AGAINST_PEFT

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's serving example")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "serve_adapters.py"


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "PEFT_FAST_BACKEND"}
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "generated tokens identical" in done.stdout, done.stdout
    return done.stdout


def test_serving_example_matches_peft(tmp_path):
    out = _run(tmp_path, "--adapters", "6", "--requests", "12", "--batch", "6", "--new-tokens", "4")
    assert "tokens/s" in out


def test_serving_example_compiled_over_a_static_cache(tmp_path):
    _run(tmp_path, "--adapters", "6", "--requests", "12", "--batch", "6", "--new-tokens", "4", "--compile",
         "--static-cache")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu_check.sh: serving)")
def test_serving_example_under_cuda_graphs(tmp_path):
    _run(tmp_path, "--adapters", "64", "--requests", "64", "--batch", "32", "--new-tokens", "16", "--cuda-graphs")
