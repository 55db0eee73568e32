"""bitsandbytes is an extra (peft-fast[bnb]): without it, peft_fast imports, adapts, quantizes to NF4 with its own
kernels, trains, saves and loads a 4-bit checkpoint, and never imports bitsandbytes. Run in a child process in
which bitsandbytes cannot be found (the same as not installed, for PEFT's and transformers' checks too)."""
import os
import subprocess
import sys
import textwrap

from tiny_models import AGAINST_PEFT

import pytest

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's own install story")

CHILD = textwrap.dedent("""
    import importlib.abc, sys

    class NoBnb(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bitsandbytes" or name.startswith("bitsandbytes."):
                raise ModuleNotFoundError(f"No module named {name!r}")  # as if not installed
            return None

    sys.meta_path.insert(0, NoBnb())
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import peft_fast

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    model = peft_fast.quantize(LlamaForCausalLM(cfg))
    peft_model = peft_fast.get_peft_model(model, peft_fast.LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 64, (2, 6))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None for p in peft_model.parameters() if p.requires_grad)
    peft_model.save_pretrained(sys.argv[1] + "/adapter")
    peft_fast.PeftModel.from_pretrained(peft_fast.quantize(LlamaForCausalLM(cfg)), sys.argv[1] + "/adapter")
    assert "bitsandbytes" not in sys.modules, "bitsandbytes was imported"
    print("OK", float(loss))
""")


def test_peft_fast_runs_qlora_without_bitsandbytes(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
