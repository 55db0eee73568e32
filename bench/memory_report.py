"""Where the peak memory of a LoRA/QLoRA training step goes: parameters, gradients, optimizer state, activations and
temporaries at the step's peak, measured by torch's MemTracker (it follows every tensor storage, on GPUs and CPUs),
for PEFT, peft_fast, and peft_fast with the fused decoder (fused=, whose loss never builds the logits); and DoRA's
peak against LoRA's, in both libraries (issue #11's target: peft_fast's DoRA step within 1.05x its LoRA step's memory).

The recipe is the whole-model one of bench/test_bench_fused_decoder.py: LoRA r=16 on all seven projections, gradient
checkpointing, AdamW; on CUDA over bitsandbytes NF4 bases (bf16 compute) when bitsandbytes is installed, else dense
bf16; on CPU dense fp32 at small shapes whose vocabulary/hidden ratio is TinyLlama's (what makes the logits matter).
One step runs before the measured one, so the optimizer state exists, as in training.

    python bench/memory_report.py [--device cpu|cuda] [--shapes tiny 1.1B 8B] [--json out.json] [--kernels]

On a CPU, --kernels runs peft_fast's Triton kernels under the interpreter, which allocates what a GPU run allocates
(the default CPU route is the PyTorch reference, whose temporaries differ); the fused-decoder variants are left out
there, being a matter of the decoder's ops rather than the adapters'.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import warnings
from pathlib import Path

# Set before torch and transformers import triton, which chooses the interpreter once, at import.
if "--kernels" in sys.argv and "cuda" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["PEFT_FAST_BACKEND"] = "triton"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchutil, test_bench_qlora_model (PYTHONSAFEPATH=1)
import benchreport  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

SHAPES = {  # name: (LlamaConfig fields, batch, sequence)
    "tiny": (dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=2000), 4, 256),
    "1.1B": (dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                  num_hidden_layers=22, vocab_size=32000), 4, 1024),
    "8B": (dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                num_hidden_layers=4, vocab_size=128256), 2, 1024),  # 4 of Llama-3-8B's 32 decoder layers
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CATEGORIES = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp", "Other")


def _base(shape: str, device: str):
    model_kw, _, seq = SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**model_kw, max_position_embeddings=seq,
                                             attn_implementation="sdpa")).to(dtype)
    quantized = False
    if device == "cuda":
        try:
            from test_bench_qlora_model import _bnb_quantize

            model, quantized = _bnb_quantize(model), True
        except ImportError:
            pass
    return model, quantized


def _recipe(lib, model, quantized: bool, offload: bool = False, dora: bool = False, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if quantized:
            model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                        gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = lib.get_peft_model(model, lib.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                         lora_dropout=0.05, task_type="CAUSAL_LM",
                                                         use_dora=dora), **kw)
    if offload:
        lib.offload_checkpoints(model)
    return model.train()


def measure(model, ids, device: str) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state, compiled kernels, caches
    from benchutil import storage_tracker

    tracker = storage_tracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")
    # the model's device; offloaded checkpoint inputs are host memory, reported apart
    per_device = next(v for d, v in peak.items() if torch.device(d).type == device)
    mib = {getattr(k, "value", str(k)): v / 2**20 for k, v in per_device.items()}
    host = sum(v.get("Total", 0) for d, v in peak.items() if torch.device(d).type != device) / 2**20
    return ({c: round(mib.get(c, 0.0), 2) for c in CATEGORIES} | {"Total": round(mib.get("Total", 0.0), 2)}
            | {"host_mib": round(host, 2)})


def report(device: str, shapes, kernels_on_cpu: bool = False, json_path=None) -> list[dict]:
    """The rows, each also printed (and the JSON rewritten) as soon as it is measured: a stage that runs out of time
    keeps what it measured."""
    import peft

    import peft_fast

    rows = []
    for shape in shapes:
        model_kw, batch, seq = SHAPES[shape]
        ids = torch.randint(0, model_kw["vocab_size"], (batch, seq), device=device)
        base, quantized = _base(shape, device)
        fused = "auto" if device == "cuda" else "compile"
        # DoRA beside LoRA first: the fused variants are the slowest to set up (compilation)
        variants = {"peft": (peft, {}), "peft_fast": (peft_fast, {}), "peft_fast dora": (peft_fast, {"dora": True}),
                    "peft dora": (peft, {"dora": True})}
        if not kernels_on_cpu:
            variants[f"peft_fast fused={fused}"] = (peft_fast, {"fused": fused})
        if device == "cuda":  # offload_checkpoints moves only CUDA tensors
            variants[f"peft_fast fused={fused} offload"] = (peft_fast, {"fused": fused, "offload": True})
        logits_mib = batch * seq * model_kw["vocab_size"] * (2 if device == "cuda" else 4) / 2**20
        for name, (lib, kw) in variants.items():
            model = _recipe(lib, copy.deepcopy(base), quantized, **kw)
            row = {"shape": shape, "variant": name, "base": "bnb nf4" if quantized else str(
                next(base.parameters()).dtype), "tokens": batch * seq, "logits_mib": round(logits_mib, 2)}
            row.update(measure(model, ids, device))
            rows.append(row)
            print(_line(row), flush=True)
            if json_path:
                _write(json_path, device, rows)
            del model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        del base
    return rows


HEADER = (f"{'shape':<6} {'variant':<30} " + " ".join(f"{c[:10]:>10}" for c in CATEGORIES + ("Total",))
          + f" {'logits':>8} {'host':>8}")


def _line(r: dict) -> str:
    return (f"{r['shape']:<6} {r['variant']:<30} " + " ".join(f"{r[c]:>10.1f}" for c in CATEGORIES + ("Total",))
            + f" {r['logits_mib']:>8.1f} {r['host_mib']:>8.1f}")


def _write(path, device: str, rows: list[dict]) -> None:
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    with open(path, "w") as fh:
        json.dump({"device": where, "torch": torch.__version__, "rows": rows}, fh, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", action="store_true", help="CPU: the Triton kernels under the interpreter")
    args = ap.parse_args()
    if args.kernels and args.device != "cpu":
        ap.error("--kernels is for --device cpu (on a GPU the kernels run anyway)")
    kernels_on_cpu = args.kernels
    if kernels_on_cpu:
        from benchutil import free_interpreter_copies

        free_interpreter_copies()
    shapes = args.shapes or (["1.1B", "8B"] if args.device == "cuda" else ["tiny"])
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"== memory at the training step's peak (MiB), {where}, torch {torch.__version__}"
          + (", Triton kernels under the interpreter" if kernels_on_cpu else ""))
    print(HEADER, flush=True)
    rows = report(args.device, shapes, kernels_on_cpu, args.json)
    print("\n".join(benchreport.dora_ratios(rows)))
    print("logits = one (tokens x vocabulary) tensor in the model's dtype; the unfused loss also holds its float32 "
          "copy and that copy's gradient; host = host memory at the peak (offloaded checkpoint inputs)")


if __name__ == "__main__":
    main()
