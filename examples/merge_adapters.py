"""Merging LoRA adapters with peft_fast, on a CPU, with nothing downloaded.

1. Pre-train the tiny Llama of demo.py on general prose (its helpers are imported from demo.py).
2. Train two LoRA adapters of the same rank on two unrelated tasks:
   "task_a", a lighthouse keeper's log (examples/data/keeper_log.txt), and
   "task_b", a synthetic task generated here: "reverse lantern -> nretnal", one word a line.
3. Merge them with add_weighted_adapter (PEFT's API): TIES and DARE (density 0.5), plus plain "linear" as a
   baseline, "cat" (both adapters side by side: the exact sum of their updates) as a reference, and the *_svd
   variants of TIES and DARE, which work on each full update B·A rather than on the A and B matrices.
4. Print the held-out loss of the base model, of each adapter and of each merge, on both tasks.
5. Save the merged adapters in PEFT's format, reload them onto a fresh copy of the base, check the logits match.

Run it with `python examples/merge_adapters.py` from anywhere. It exits non-zero if a check fails.
"""
from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo.py, also when the script's folder is not on sys.path
from demo import SEED, SEQ_LEN, build_base, encode, train  # noqa: E402  (python -P, PYTHONSAFEPATH)
from peft_fast import LoraConfig, PeftModel, get_peft_model

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
OUT = HERE / "out"
ADAPTERS = ["task_a", "task_b"]
WEIGHTS = [1.0, 1.0]  # task arithmetic: add both updates at full strength
DENSITY = 0.5         # TIES keeps the largest half of each update; DARE keeps a random half, rescaled by 2
MERGES = {            # adapter name -> add_weighted_adapter keyword arguments
    # These combine the A matrices and the B matrices separately (each scaled by sqrt(weight * scaling)),
    # so the merged update B·A also holds cross terms such as B_a·A_b.
    "linear": dict(combination_type="linear"),
    "ties": dict(combination_type="ties", density=DENSITY),
    "dare_linear": dict(combination_type="dare_linear", density=DENSITY),
    # "cat" stacks both adapters into one of rank 32: its update is exactly the weighted sum of theirs.
    "cat": dict(combination_type="cat"),
    # The *_svd variants apply the same method to the full updates B·A, then take a rank-16 SVD of the result.
    "ties_svd": dict(combination_type="ties_svd", density=DENSITY),
    "dare_linear_svd": dict(combination_type="dare_linear_svd", density=DENSITY),
}


def keeper_log_task() -> tuple[str, str]:
    """Task A: the keeper's log, split at a day boundary; the last ~15% of the days are held out."""
    text = (DATA / "keeper_log.txt").read_text(encoding="utf-8")
    days = [m.start() for m in re.finditer(r"^Day \d+\.", text, flags=re.M)]
    cut = days[int(len(days) * 0.85)]
    return text[:cut], text[cut:]


def reverse_task() -> tuple[str, str]:
    """Task B: "reverse <word> -> <drow>", over words from the prose; held-out lines use held-out words."""
    prose = (DATA / "prose.txt").read_text(encoding="utf-8").lower()
    words = sorted(set(re.findall(r"\b[a-z]{3,9}\b", prose)))
    rng = random.Random(SEED)
    rng.shuffle(words)
    cut = int(len(words) * 0.8)

    def lines(pool: list[str], n: int) -> str:
        return "".join(f"reverse {w} -> {w[::-1]}\n" for w in rng.choices(pool, k=n))

    return lines(words[:cut], 600), lines(words[cut:], 120)


@torch.no_grad()
def eval_loss(model, text: str) -> float:
    """Mean next-byte loss over consecutive SEQ_LEN windows of held-out text (the same windows for every model)."""
    ids = encode(text)
    windows = [ids[s:s + SEQ_LEN] for s in range(0, len(ids) - 1, SEQ_LEN)]
    total, count = 0.0, 0
    for w in windows:
        n = len(w) - 1  # predicted positions in this window
        if n < 1:
            continue
        total += model(input_ids=w[None], labels=w[None]).loss.item() * n
        count += n
    return total / count


def main() -> int:
    t0 = time.perf_counter()
    hf_logging.disable_progress_bar()
    failures = []
    tasks = {"task_a": keeper_log_task(), "task_b": reverse_task()}
    for name, (train_text, held_out) in tasks.items():
        print(f"{name}: {len(train_text):,} bytes to train on, {len(held_out):,} held out, "
              f"e.g. {held_out.splitlines()[0][:60]!r}")

    # 1. The base model, as in demo.py: pre-train every weight on general prose, then keep a copy on disk.
    prose = encode((DATA / "prose.txt").read_text(encoding="utf-8"))
    print(f"\n1. pre-training a tiny Llama on {len(prose):,} bytes of prose")
    model = build_base()
    train(model, prose, steps=400, lr=3e-3, every=100)
    model.save_pretrained(OUT / "merge_base")

    # 2. One adapter per task: same rank and targets (ties and dare merge A and B matrices entry by entry).
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM")
    model = get_peft_model(model, config, adapter_name="task_a")
    model.add_adapter("task_b", config)
    for name in ADAPTERS:
        print(f"\n2. training adapter {name!r}")
        model.set_adapter(name)  # the active adapter is the one that trains
        train(model, encode(tasks[name][0]), steps=200, lr=3e-3, every=50)

    # 3. Merge the two adapters into new ones. DARE drops entries at random: seed it.
    print(f"\n3. merging {ADAPTERS} with weights {WEIGHTS}")
    for name, kwargs in MERGES.items():
        torch.manual_seed(SEED)
        model.add_weighted_adapter(ADAPTERS, WEIGHTS, adapter_name=name, **kwargs)
        print(f"  {name:16s} {kwargs}  rank {model.peft_config[name].r}")
    model.eval()  # a newly added adapter's dropout starts in training mode, as in PEFT: switch it off

    # 4. Held-out loss of every adapter on both tasks.
    print("\n4. held-out loss (lower is better)")
    losses = {}
    with model.disable_adapter():
        losses["base"] = {t: eval_loss(model, held_out) for t, (_, held_out) in tasks.items()}
    for name in ADAPTERS + list(MERGES):
        model.set_adapter(name)
        losses[name] = {t: eval_loss(model, held_out) for t, (_, held_out) in tasks.items()}
    print(f"  {'adapter':16s} {'task_a':>8s} {'task_b':>8s}")
    for name, row in losses.items():
        print(f"  {name:16s} {row['task_a']:8.3f} {row['task_b']:8.3f}")
    for name in ADAPTERS:
        if not losses[name][name] < losses["base"][name]:
            failures.append(f"adapter {name} does not beat the base model on its own task")

    # 5. Save only the merged adapters (each goes in a subdirectory named after it), reload them onto a fresh base.
    out = OUT / "merged"
    model.save_pretrained(out, selected_adapters=list(MERGES))
    print(f"\n5. saved {list(MERGES)} to {out}/<name>/, reloading them onto a fresh copy of the base")
    base = LlamaForCausalLM.from_pretrained(OUT / "merge_base")
    first, *rest = MERGES
    reloaded = PeftModel.from_pretrained(base, out / first, adapter_name=first)
    for name in rest:
        reloaded.load_adapter(out / name, adapter_name=name)
    reloaded.eval()
    probe = encode(tasks["task_a"][1][:SEQ_LEN // 2] + tasks["task_b"][1][:SEQ_LEN // 2])[None]
    for name in MERGES:
        model.set_adapter(name)
        reloaded.set_adapter(name)
        with torch.no_grad():
            same = torch.equal(model(input_ids=probe).logits, reloaded(input_ids=probe).logits)
        print(f"  {name:16s} reloaded logits {'identical' if same else 'DIFFER'}")
        if not same:
            failures.append(f"reloaded adapter {name} gives different logits")

    print(f"\n{'FAILED' if failures else 'all checks passed'}, {time.perf_counter() - t0:.0f} s")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
