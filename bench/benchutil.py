"""Shared by the benchmarks: device and sizes, timing both sides the same way, peak memory, the result rows.

The ratio peft_fast/PEFT comes from `time_pair`, which times both sides with one clock, interleaved round by
round, so drift (clocks, other processes) hits both equally. The pytest-benchmark fixture additionally times
peft_fast alone, so its JSON and table keep their usual meaning.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
import warnings

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Base weights in bf16 as people train them on GPUs; adapters stay fp32 as PEFT keeps them. CPU runners without
# native bf16 (AVX512-BF16/AMX) run bf16 matmuls many times slower than fp32, so CPU runs use fp32.
BASE_DTYPE = torch.bfloat16 if ON_GPU else torch.float32
RANK, ALPHA = 16, 32

# Each side gets about this much wall time in time_pair (seconds); a round lasts at least ROUND_S, so that
# short ops (decode) are not measured as mostly host<->device sync.
PAIR_BUDGET_S = 0.5 if ON_GPU else 0.3
ROUND_S = 2e-3 if ON_GPU else 5e-3
MIN_ROUNDS, MAX_ROUNDS = 5, 200

MEMORY_NOTE = ("peak memory: GPU only (torch.cuda.max_memory_allocated, extra bytes during one call); "
               "on CPU torch's allocator is invisible to tracemalloc, so it is not measured")

RESULTS: list[dict] = []  # one row per benchmark, printed by conftest's terminal summary


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _clock(fn, inner: int) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - t0) / inner


def time_many(*fns) -> list[float]:
    """Median seconds per call of each of `fns`, measured round-robin with the same clock and repeat count."""
    once = max(_clock(fn, 1) for fn in fns)
    inner = max(1, int(ROUND_S / max(once, 1e-9)))
    times: list[list[float]] = [[] for _ in fns]
    deadline = time.perf_counter() + len(fns) * PAIR_BUDGET_S
    while len(times[0]) < MIN_ROUNDS or (time.perf_counter() < deadline and len(times[0]) < MAX_ROUNDS):
        for fn, ts in zip(fns, times):
            ts.append(_clock(fn, inner))
    return [statistics.median(ts) for ts in times]


def time_pair(fast, ref) -> tuple[float, float]:
    """Median seconds per call of each, measured alternately with the same clock and the same repeat count."""
    fast_s, ref_s = time_many(fast, ref)
    return fast_s, ref_s


def peak_mib(fn) -> float | None:
    """Extra device memory one call needs at its peak, over what was allocated before it; None on CPU."""
    if not ON_GPU:
        return None
    gc.collect()
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def inference(model, x):
    """A no-grad forward of `model` on `x`, as a zero-argument callable (what decode benchmarks time)."""
    def run():
        with torch.no_grad():
            return model(x)
    return run


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def measure(benchmark, label: str, fast, ref, *, baseline: str, err: float | None = None, warmup: int = 3,
            also: dict | None = None, extra=None) -> dict:
    """Time and size peft_fast (`fast`) against its baseline (`ref`); record the row in RESULTS and extra_info.

    `also`: {name: fn} timed in the same interleaved rounds as the pair (e.g. the base model alone); each lands
    in the row as `<name>_ms`. `extra(row) -> dict`: further fields computed from the timed row (overheads,
    bandwidths); a `note` string among them is printed after the row in the tables.
    """
    also = also or {}
    for _ in range(warmup):  # Triton compilation, cuBLAS handles, the caching allocator, optimizer state
        fast()
        ref()
        for fn in also.values():
            fn()
    sync()
    fast_s, ref_s, *also_s = time_many(fast, ref, *also.values())
    fast_mem, ref_mem = peak_mib(fast), peak_mib(ref)

    def fast_synced():
        fast()
        sync()

    benchmark.group = label
    benchmark(fast_synced)
    row = {
        "label": label,
        "baseline": baseline,
        "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
        "peft_fast_ms": fast_s * 1e3,
        "peft_ms": ref_s * 1e3,
        "ratio": fast_s / ref_s,
        "peft_fast_peak_mib": fast_mem,
        "peft_peak_mib": ref_mem,
        "mem_ratio": (fast_mem / ref_mem) if fast_mem is not None and ref_mem else None,
        "rel_err": err,
    }
    row.update({f"{name}_ms": t * 1e3 for name, t in zip(also, also_s)})
    if extra is not None:
        row.update(extra(row))
    if err is not None and err > 2e-2:
        warnings.warn(f"{label}: peft_fast and {baseline} outputs differ by {err:.2e} (relative); "
                      "the timing compares different functions", stacklevel=2)
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    rows_file = os.environ.get("PEFT_FAST_BENCH_ROWS")
    if rows_file:  # one line per benchmark as it finishes: survives a run killed by its time limit
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def format_table(rows: list[dict]) -> list[str]:
    """The comparison table: times are medians of interleaved rounds; ratio < 1 means peft_fast is faster."""
    lines = []
    for r in rows:
        line = (f"{r['label']}: peft_fast {r['peft_fast_ms']:.3f} ms, peft {r['peft_ms']:.3f} ms, "
                f"ratio {r['ratio']:.2f}")
        if r.get("peft_fast_peak_mib") is not None and r.get("peft_peak_mib") is not None:
            line += f" | peak MiB {r['peft_fast_peak_mib']:.0f} vs {r['peft_peak_mib']:.0f}"
            if r.get("mem_ratio") is not None:
                line += f" ({r['mem_ratio']:.2f})"
        if r.get("rel_err") is not None:
            line += f" | err {r['rel_err']:.1e}"
        if r.get("note"):
            line += f" | {r['note']}"
        lines.append(line)
    return lines
