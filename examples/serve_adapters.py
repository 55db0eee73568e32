"""Serving many adapters at once: every request names its own adapter, and a batch mixes them.

    python examples/serve_adapters.py                       # CPU: 16 adapters, batches of 8, 16 new tokens each
    python examples/serve_adapters.py --device cuda --adapters 64 --batch 32 --cuda-graphs   # static cache

A small Llama (the demo's shape, random weights: this is about speed, not text) gets N LoRA adapters of mixed
ranks. A stream of requests, each naming one adapter (or "__base__"), is served in batches with
`generate(..., adapter_names=[...])`: one forward per token for the whole batch, whatever adapters it mixes.
The same stream runs through Hugging Face PEFT with the same adapter weights, and through the base model alone;
the script prints tokens/s for each and checks that peft_fast and PEFT generate the same tokens (greedy).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # demo.py, also when the script's folder is not
from demo import DATA, build_base, encode  # noqa: E402  (on sys.path: python -P, PYTHONSAFEPATH)

import peft_fast  # noqa: E402

RANKS = (8, 16, 32, 64)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="requests per batch")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the peft_fast model's forward")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="torch.compile(mode='reduce-overhead') over a static cache: the decode step replayed as a "
                        "CUDA graph")
    p.add_argument("--static-cache", action="store_true",
                   help="generate with transformers' static KV cache (fixed shapes: one compiled decode step)")
    p.add_argument("--no-peft", action="store_true", help="skip the Hugging Face PEFT baseline")
    return p.parse_args()


def adapters(n: int) -> list[tuple[str, int]]:
    return [(f"adapter{i:03d}", RANKS[i % len(RANKS)]) for i in range(n)]


def build(lib, base, specs):
    """`lib` (peft_fast or peft) over a copy of `base` with the adapters in `specs` (random B: they matter)."""
    model = None
    for name, r in specs:
        config = lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
        if model is None:
            model = lib.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def stream(specs, args) -> list[tuple[torch.Tensor, str]]:
    text = encode((DATA / "keeper_log.txt").read_text(encoding="utf-8"))
    rnd = random.Random(0)
    names = [n for n, _ in specs] + ["__base__"]
    out = []
    for _ in range(args.requests):
        start = rnd.randrange(len(text) - args.prompt_tokens)
        out.append((text[start:start + args.prompt_tokens], rnd.choice(names)))
    return out


def serve(model, requests, args, mixed: bool) -> tuple[float, list[torch.Tensor]]:
    """(tokens per second, generated ids per batch) for the whole stream."""
    outputs, tokens, start = [], 0, time.perf_counter()
    for i in range(0, len(requests), args.batch):
        chunk = requests[i:i + args.batch]
        ids = torch.stack([p for p, _ in chunk]).to(args.device)
        kw = {"adapter_names": [n for _, n in chunk]} if mixed else {}
        if args.static_cache or args.cuda_graphs:  # CUDA graphs replay fixed shapes: the cache must not grow
            kw["cache_implementation"] = "static"
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **kw)
        outputs.append(out[:, ids.shape[1]:].cpu())
        tokens += out.shape[0] * args.new_tokens
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start), outputs


def main() -> int:
    args = parse()
    warnings.simplefilter("ignore")
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: more threads only wait on each other on a busy machine
    torch.manual_seed(0)
    base = build_base().to(args.device).eval()
    specs = adapters(args.adapters)
    fast = build(peft_fast, base, specs)
    requests = stream(specs, args)
    if args.compile or args.cuda_graphs:  # generate() calls the base model's forward once per token: compile that
        inner = fast.get_base_model()
        inner.forward = torch.compile(inner.forward, mode="reduce-overhead" if args.cuda_graphs else None)
    serve(fast, requests[:args.batch], args, mixed=True)  # warm-up: stacks, kernels, compilation
    fast_tps, fast_out = serve(fast, requests, args, mixed=True)
    base_tps, _ = serve(base, requests, args, mixed=False)
    print(f"{args.adapters} adapters (ranks {RANKS}), {args.requests} requests in batches of {args.batch}, "
          f"{args.new_tokens} new tokens each, on {args.device}")
    print(f"  base model alone   {base_tps:8.1f} tokens/s")
    print(f"  peft_fast          {fast_tps:8.1f} tokens/s  ({fast_tps / base_tps:.2f}x the base model's)")
    ok = True
    if not args.no_peft:
        import peft

        ref = build(peft, base, specs)
        ref.load_state_dict({k: v for k, v in fast.state_dict().items() if "lora_" in k}, strict=False)
        serve(ref, requests[:args.batch], args, mixed=True)
        ref_tps, ref_out = serve(ref, requests, args, mixed=True)
        same = all(torch.equal(a, b) for a, b in zip(fast_out, ref_out))
        print(f"  Hugging Face PEFT  {ref_tps:8.1f} tokens/s  (peft_fast is {fast_tps / ref_tps:.2f}x as fast); "
              f"generated tokens {'identical' if same else 'DIFFER'}")
        ok = same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
