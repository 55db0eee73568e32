"""Shared by the benchmarks: device and sizes, timing both sides the same way, peak memory, the result rows.

Every benchmark runs twice, as `impl` "peft_fast" and "baseline" (`@both_sides`), in one pytest-benchmark group:
pytest-benchmark's table for that group then shows peft_fast and its baseline side by side. Their ratio does not
come from those two separate fixture runs but from `time_pair` / `time_many`, which time both sides with one
clock, interleaved round by round, so drift (clocks, other processes) hits both equally. Whichever side runs
first measures the pair and records the row; the other reuses it.
"""
from __future__ import annotations

import gc
import json
import os
import re
import statistics
import time
import warnings

import pytest
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

IMPLS = ("peft_fast", "baseline")
# The top decorator of every benchmark: the two sides of a case run next to each other ([...-peft_fast], then
# [...-baseline]), so a run cut short by a time limit still has both halves of what it finished.
both_sides = pytest.mark.parametrize("impl", IMPLS)

RESULTS: list[dict] = []  # one row per benchmark (per label), in run order: conftest prints and writes them
_ROWS: dict[str, dict] = {}  # label -> its row, for the side that runs second


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


def storage_tracker():
    """torch's MemTracker (every tensor storage, by kind: parameters, gradients, optimizer state, activations,
    temporaries; any device), made to accept frozen parameters: it hooks every parameter's gradient, which a frozen
    base weight cannot take (the adapters' gradients are still found on .grad and by the storages backward makes)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAwareTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return FrozenAwareTracker()


def free_interpreter_copies() -> None:
    """Under Triton's interpreter, free each launch's argument copies as the launch ends. The interpreter keeps them
    (and the arguments' storages) in reference cycles, through its recursive nested copy helpers, until the next
    garbage collection. Storage-level memory measurements would then count tensors that a GPU run has already freed:
    at one collection per launch, a LoRA step over three layers measured 12% less. No-op without the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    call = interpreter.GridExecutor.__call__
    if getattr(call, "_collects", False):
        return

    def collecting(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            gc.collect()

    collecting._collects = True
    interpreter.GridExecutor.__call__ = collecting


def tracked_peak(fn) -> dict[str, float]:
    """MiB by kind ("Parameter", "Gradient", "Activation", "Temp", "Optstate", ..., "Total") at the peak of one call."""
    tracker = storage_tracker()
    with tracker:
        fn()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()), {})
    return {getattr(k, "value", str(k)): v / 2**20 for k, v in peak.items()}


class _NewStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensor storages that ops create while active and that are still alive, and their peak. A storage
    an op was given (in-place results, views, out= buffers) is not new, so what existed before is never counted.
    No module or gradient hooks (MemTracker's would stay on the tensors of a call that uses autograd.grad)."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.peak = 0

    @staticmethod
    def _storages(tree) -> dict:
        out = {}
        for t in torch.utils._pytree.tree_leaves(tree):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                out[(st.data_ptr(), st.nbytes())] = st
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        from torch.multiprocessing.reductions import StorageWeakRef

        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        given = self._storages((args, kwargs))
        for key, st in self._storages(out).items():
            if key not in given and key not in self.live and st.nbytes():
                self.live[key] = (StorageWeakRef(st), st.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_mib(fn) -> float | None:
    """Extra memory one call needs at its peak, over what was allocated before it: on GPUs the caching allocator's
    peak, on CPUs the peak of the tensor storages the call's ops create (`_NewStorages`)."""
    if not ON_GPU:
        tracker = _NewStorages()
        with tracker:
            fn()
        return tracker.peak / 2**20
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


def measure(benchmark, impl: str, label: str, fast, ref, *, baseline: str, err: float | None = None,
            warmup: int = 3, also: dict | None = None, extra=None) -> dict:
    """Benchmark side `impl` of peft_fast (`fast`) against its baseline (`ref`) in pytest-benchmark group `label`.

    The first side to run for a label also times both in interleaved rounds (`time_many`), sizes them, and records
    the row (RESULTS, PEFT_FAST_BENCH_ROWS); both sides carry the row, ratio included, in their extra_info.
    `also`: {name: fn} timed in the same interleaved rounds as the pair (e.g. the base model alone); each lands
    in the row as `<name>_ms`. `extra(row) -> dict`: further fields computed from the timed row (overheads,
    bandwidths); a `note` string among them is printed after the row in the tables.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    own = fast if impl == "peft_fast" else ref
    row = _ROWS.get(label)
    if row is None:
        row = _measure_pair(label, fast, ref, baseline=baseline, err=err, warmup=warmup, also=also or {},
                            extra=extra)
        # The test case without its side, e.g. bench/test_bench_dora.py::test_dora_decode[1]
        row["benchmark"] = re.sub(rf"(-{impl}\]$)|(\[{impl}\]$)", lambda m: "]" if m.group(1) else "",
                                  benchmark.fullname)
        row["group"] = label
        _ROWS[label] = row
        RESULTS.append(row)
        rows_file = os.environ.get("PEFT_FAST_BENCH_ROWS")
        if rows_file:  # one line per benchmark as it finishes: survives a run killed by its time limit
            with open(rows_file, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
    else:
        for _ in range(warmup):  # this side's fresh copies: optimizer state, caches
            own()

    def synced():
        own()
        sync()

    benchmark.group = label
    benchmark.extra_info.update(row, impl=impl)
    benchmark(synced)
    return row


def _measure_pair(label, fast, ref, *, baseline, err, warmup, also, extra) -> dict:
    for _ in range(warmup):  # Triton compilation, cuBLAS handles, the caching allocator, optimizer state
        fast()
        ref()
        for fn in also.values():
            fn()
    sync()
    fast_s, ref_s, *also_s = time_many(fast, ref, *also.values())
    fast_mem, ref_mem = peak_mib(fast), peak_mib(ref)
    row = {
        "label": label,
        "baseline": baseline,
        "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
        "peft_fast_ms": fast_s * 1e3,
        "peft_ms": ref_s * 1e3,  # the baseline's, whatever `baseline` names (the key predates other baselines)
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
                      "the timing compares different functions", stacklevel=3)
    return row
