"""Host time of one adapter layer per call: the Python and torch work that wraps the kernels, which is what a GPU
waits on at decode and at small layers. Hugging Face PEFT's eager layer at the same shapes is the baseline;
median of interleaved rounds.

- `--device cpu` (default, any machine): the Triton path is forced (PEFT_FAST_BACKEND=triton, TRITON_INTERPRET=1)
  and each kernel's launch is replaced by a counter, so the numbers are host time without launches (base matmuls
  still run, on tiny CPU tensors, one thread).
- `--device fake`: Triton's own launch path on a stand-in sm_90 GPU (fake_gpu.py: kernels compile for real, the
  launcher only returns), so the numbers include Triton's dispatcher or peft_fast's cached launches but not the
  CUDA driver's launch call. The Triton path is forced for CPU tensors.
- `--device cuda`: real launches on a GPU at the same tiny shapes, synchronized per round: host time including
  Triton's launch path (the GPU work is negligible at these shapes).

With real launches (fake, cuda) peft_fast runs twice, launching through its cached compiled kernels (the default)
and through Triton's dispatcher on every launch (PEFT_FAST_LAUNCH=jit): `launch_gain_us` is what the cache saves.

    .venv/bin/python bench/host_overhead.py [--device cpu|fake|cuda] [--json out.json] [--rounds 7] [--iters 300]
        [--breakdown]  (also: where a LoRA layer's fwd+bwd time goes, level by level)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

def _mode(argv: list[str]) -> str:
    """--device's value, read before torch and peft_fast are imported (the interpreter is chosen at import)."""
    for i, a in enumerate(argv):
        if a.startswith("--device="):
            return a.split("=", 1)[1]
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
    return "cpu"


MODE = _mode(sys.argv)
DEVICE = "cuda" if MODE == "cuda" else "cpu"
if MODE == "cpu":  # before peft_fast is imported: Triton picks the interpreter when kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["PEFT_FAST_BACKEND"] = "triton"
if MODE == "fake":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fake_gpu  # noqa: E402  (kernels must be decorated as JIT functions, before peft_fast)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

if DEVICE == "cpu":
    torch.set_num_threads(1)

import peft  # noqa: E402

import peft_fast  # noqa: E402
import peft_fast.kernels  # noqa: E402
from peft_fast.kernels.common import backend, settings  # noqa: E402

LAUNCHES: list[str] = []


def force_triton_on_cpu() -> None:
    """Every `use_triton` answer True, as on a GPU (the stand-in device's tensors live on the CPU)."""
    original = backend.use_triton
    for name, mod in list(sys.modules.items()):
        if name.startswith("peft_fast") and mod is not None and getattr(mod, "use_triton", None) is original:
            mod.use_triton = lambda *tensors: True


class _Launches:
    """Stands in for a Triton kernel: `kernel[grid](...)` records the launch, then launches it (`real`) or not."""

    def __init__(self, name: str, kernel, real: bool):
        self.name, self.kernel, self.real = name, kernel, real

    def __getitem__(self, grid):
        if self.real:
            return lambda *args, **kwargs: (LAUNCHES.append(self.name), self.kernel[grid](*args, **kwargs))
        return lambda *args, **kwargs: LAUNCHES.append(self.name)


_WRAPPED: list[tuple] = []


def count_launches(real: bool) -> int:
    """Wrap every Triton kernel object in the loaded peft_fast.kernels modules in a launch counter (`uncount`
    puts them back: a wrapped kernel always goes through Triton's dispatcher)."""
    for name, mod in list(sys.modules.items()):
        if not name.startswith("peft_fast.kernels") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            # kernels only (named *_kernel): device functions are resolved by the compiler, never launched
            if attr.endswith("_kernel") and type(value).__name__ in ("JITFunction", "InterpretedFunction"):
                setattr(mod, attr, _Launches(attr, value, real))
                _WRAPPED.append((mod, attr, value))
    return len(_WRAPPED)


def uncount() -> None:
    while _WRAPPED:
        mod, attr, value = _WRAPPED.pop()
        setattr(mod, attr, value)


def _model(in_f: int, out_f: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_f, out_f, device=DEVICE))


class _Mixed(nn.Module):
    """A PEFT model with four adapters, called with one adapter per token (a mixed decode batch)."""

    NAMES = ["a0", "a1", "a2", "a3"]

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, adapter_names=self.NAMES)


def _layer(lib, kind: str, in_f: int, out_f: int, r: int):
    if kind == "mixed":
        cfg = lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(_model(in_f, out_f), cfg, adapter_name="a0")
            for name in _Mixed.NAMES[1:]:
                model.add_adapter(name, cfg)
        return _Mixed(model)
    base = _model(in_f, out_f)
    if kind == "qlora":
        if lib is peft:
            return None  # PEFT over a 4-bit base needs bitsandbytes' CUDA/CPU kernels: no stubbed baseline
        peft_fast.quantize(base)
    cfg = dict(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False,
               lora_dropout=0.1 if kind == "dropout" else 0.0, use_dora=kind == "dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(base, lib.LoraConfig(**cfg))
    layer = model.base_model.model[0]
    return layer


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _train_step(layer, x, g):
    y = layer(x)
    torch.autograd.backward(y, g)


def _decode(layer, x, g):
    with torch.no_grad():
        layer(x)


CASES = {  # name: (layer kind, step, training)
    "lora fwd+bwd": ("lora", _train_step, True),
    "lora+dropout fwd+bwd": ("dropout", _train_step, True),
    "dora fwd+bwd": ("dora", _train_step, True),
    "qlora fwd+bwd": ("qlora", _train_step, True),
    "lora decode (eval, no grad)": ("lora", _decode, False),
    "dora decode (eval, no grad)": ("dora", _decode, False),
    "mixed decode, 4 adapters (eval)": ("mixed", _decode, False),
}


def measure(rounds: int, iters: int, in_f: int = 64, out_f: int = 64, r: int = 8, tokens: int = 4) -> list[dict]:
    rows = []
    for name, (kind, step, training) in CASES.items():
        layers = {lib.__name__: _layer(lib, kind, in_f, out_f, r) for lib in (peft_fast, peft)}
        if MODE != "cpu":  # the same layer again, launching through Triton's dispatcher every time
            layers["peft_fast_jit"] = layers["peft_fast"]
        x = torch.randn(tokens, in_f, device=DEVICE, requires_grad=training)
        g = torch.randn(tokens, out_f, device=DEVICE)
        times: dict[str, list[float]] = {k: [] for k, v in layers.items() if v is not None}
        launches = {}
        for lib, layer in layers.items():
            if layer is None:
                continue
            layer.train(training)
            with settings.override(launch="jit" if lib == "peft_fast_jit" else "cached"):
                for _ in range(20):  # warm-up: plans, caches, autograd
                    step(layer, x, g)
                if MODE != "cpu":
                    count_launches(real=True)
                LAUNCHES.clear()
                step(layer, x, g)
                if MODE != "cpu":
                    uncount()
                    step(layer, x, g)  # warm again without the counters
            launches[lib] = len(LAUNCHES)
        for _ in range(rounds):
            for lib in times:
                layer = layers[lib]
                with settings.override(launch="jit" if lib == "peft_fast_jit" else "cached"):
                    _sync()
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        step(layer, x, g)
                    _sync()
                times[lib].append((time.perf_counter() - t0) / iters * 1e6)
        row = {"case": name, "peft_fast_us": statistics.median(times["peft_fast"]),
               "peft_fast_launches": launches["peft_fast"]}
        if "peft_fast_jit" in times:
            row["peft_fast_jit_us"] = statistics.median(times["peft_fast_jit"])
            row["launch_gain_us"] = row["peft_fast_jit_us"] - row["peft_fast_us"]
        if "peft" in times:
            row["peft_us"] = statistics.median(times["peft"])
            row["ratio"] = row["peft_fast_us"] / row["peft_us"]
        rows.append(row)
    return rows


def breakdown(rounds: int, iters: int, in_f: int = 64, out_f: int = 64, r: int = 8, tokens: int = 4) -> dict:
    """Where a LoRA layer's fwd+bwd host time goes: each row is one level deeper into the call (the layer's
    forward, its launch plan, the op's entry, the autograd.Function, then the forward and backward bodies alone),
    so the differences between rows are what each level adds."""
    import importlib

    op = importlib.import_module("peft_fast.kernels.lora_linear")
    layer = _layer(peft_fast, "lora", in_f, out_f, r)
    layer.train(True)
    x = torch.randn(tokens, in_f, device=DEVICE, requires_grad=True)
    g = torch.randn(tokens, out_f, device=DEVICE)
    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    z = torch.empty(tokens, r, device=DEVICE)
    plan = layer.plan(x)
    steps = {
        "layer(x) fwd+bwd": lambda: _train_step(layer, x, g),
        "its launch plan fwd+bwd": lambda: torch.autograd.backward(plan(x), g),
        "lora_linear_triton fwd+bwd": lambda: torch.autograd.backward(
            op.lora_linear_triton(x, w, None, a, b, 2.0, 0.0, None), g),
        "autograd.Function fwd+bwd": lambda: torch.autograd.backward(
            op._OP.eager.apply(x, w, None, a, b, None, 2.0, 0.0, None), g),
        "forward body alone": lambda: op._forward(x.detach(), w, None, a, b, None, 2.0, 0.0, None),
        "backward body alone": lambda: op._backward_impl(g, x.detach(), w, a, b, z, None, 2.0, 0.0, True, True, True),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for f in steps.values():
        for _ in range(20):
            f()
    for _ in range(rounds):
        for k, f in steps.items():
            _sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                f()
            _sync()
            times[k].append((time.perf_counter() - t0) / iters * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "fake", "cuda"), default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--breakdown", action="store_true", help="also time each level of a LoRA layer's call")
    args = ap.parse_args()
    if MODE == "fake":
        fake_gpu.install()
        fake_gpu.RECORDER.record = False  # the launcher returns at once, as a real one does after queueing
        force_triton_on_cpu()
    kernels = count_launches(real=False) if MODE == "cpu" else 0
    rows = measure(args.rounds, args.iters)
    where = {"cpu": f"{kernels} Triton kernels stubbed, 1 thread",
             "fake": "Triton's launch path on a stand-in sm_90 GPU, 1 thread"}.get(MODE) or torch.cuda.get_device_name()
    print(f"host time per call on {MODE} ({where}), torch {torch.__version__}, x [4, 64], r 8 "
          "(ratio = peft_fast / PEFT eager)")
    for row in rows:
        peft_part = (f"   PEFT {row['peft_us']:7.1f} us   ratio {row['ratio']:.2f}" if "peft_us" in row else "")
        jit_part = (f"   dispatcher every launch {row['peft_fast_jit_us']:7.1f} us" if "peft_fast_jit_us" in row
                    else "")
        print(f"{row['case']:<30} peft_fast {row['peft_fast_us']:7.1f} us  ({row['peft_fast_launches']} launches)"
              + peft_part + jit_part)
    levels = breakdown(args.rounds, args.iters) if args.breakdown else None
    if levels:
        print("lora fwd+bwd, level by level (each row one call deeper):")
        for k, v in levels.items():
            print(f"  {k:<30} {v:7.1f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": MODE, "torch": torch.__version__, "rows": rows, "breakdown": levels}, fh, indent=2)


if __name__ == "__main__":
    main()
