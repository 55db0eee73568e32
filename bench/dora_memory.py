"""DoRA's memory over LoRA's on the kernels' path: the extra peak of one training step (forward, backward, AdamW) of
a stack of adapted linear layers, DoRA against LoRA, without and with dropout, measured by torch's MemTracker over
tensor storages. Hugging Face PEFT's DoRA/LoRA ratio on the same stack, in the same run, is the baseline. On a CPU
the Triton kernels run under the interpreter, which allocates what a GPU run allocates, so the ratio holds for GPUs
(the times do not).

    python bench/dora_memory.py [--width 256] [--layers 3] [--tokens 128] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

if "cuda" not in sys.argv:  # before peft_fast is imported: Triton picks the interpreter when kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["PEFT_FAST_BACKEND"] = "triton"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import peft  # noqa: E402

import peft_fast  # noqa: E402
from benchutil import free_interpreter_copies, tracked_peak  # noqa: E402


def extra_peak(lib, dora: bool, p: float, width: int, layers: int, tokens: int, device: str) -> float:
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(stack, lib.LoraConfig(
            r=16, lora_alpha=32, target_modules=[str(i) for i in range(layers)], use_dora=dora, lora_dropout=p))
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad])
    x = torch.randn(1, tokens, width, device=device, requires_grad=True)
    gy = torch.randn(1, tokens, width, device=device)

    def step():
        model(x).backward(gy)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    kinds = tracked_peak(step)
    return kinds.get("Total", 0.0) - sum(kinds.get(k, 0.0) for k in ("Parameter", "Buffer", "Optstate"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    free_interpreter_copies()
    print(f"extra peak memory of a training step, {args.layers} x {args.width}-wide layers, {args.tokens} tokens, "
          f"{args.device} (Triton path)")
    for p in (0.0, 0.05):
        row = []
        for lib in (peft_fast, peft):
            lora, dora = (extra_peak(lib, d, p, args.width, args.layers, args.tokens, args.device)
                          for d in (False, True))
            row.append(f"{lib.__name__}: LoRA {lora:.3f} MiB, DoRA {dora:.3f} MiB, DoRA/LoRA {dora / lora:.2f}")
        print(f"dropout {p}: " + "; ".join(row))


if __name__ == "__main__":
    main()
