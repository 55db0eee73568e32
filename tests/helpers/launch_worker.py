"""The cached launch path (kernels/common/launch.py) against Triton's dispatcher, on a stand-in sm_90 GPU
(bench/fake_gpu.py: kernels compile for real, the launcher records instead of launching).

Every op with a Triton path runs its calls three times: once with PEFT_FAST_LAUNCH=jit (the dispatcher on every
launch) and twice cached (the first call fills the cache, the second must launch from it). The launches the
launcher receives must be the same in all three: the same compiled kernel (function handle), grid, stream and
arguments. The other checks: what makes Triton compile another specialization (alignment, ints, dtypes, device)
is in the fingerprint; profiler hooks, the jit setting and stand-ins keep the dispatcher. Results go to
OUT/results.json as {check: error or null}; tests/kernels/test_launch.py makes the assertions.

    TRITON_INTERPRET unset: python launch_worker.py OUT
"""
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fake_gpu  # noqa: E402  (before peft_fast: kernels must be JIT functions)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import peft_fast.kernels as K  # noqa: E402
from peft_fast.kernels.common import launch as L  # noqa: E402
from peft_fast.kernels.common import lora_mm, settings  # noqa: E402

FAKE = fake_gpu.install()
REC = fake_gpu.RECORDER
DISPATCHES = [0]
_run = JITFunction.run


def _counting_run(self, *args, **kwargs):
    DISPATCHES[0] += 1
    return _run(self, *args, **kwargs)


JITFunction.run = _counting_run


def norm(v):
    """A launch argument as what a launch depends on: tensors by dtype, shape, strides and 16-byte alignment
    (fresh outputs differ in address between runs), everything else by type and value."""
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape), v.stride(), v.data_ptr() % 16 == 0)
    return (type(v).__name__, v)


def run_recorded(fn, mode):
    REC.launches.clear()
    DISPATCHES[0] = 0
    with settings.override(launch=mode):
        torch.manual_seed(0)
        fn()
    return [(name, handle, grid, stream, tuple(map(norm, args))) for name, handle, grid, stream, args in
            REC.launches], DISPATCHES[0]


def same_as_dispatcher(fn):
    jit, jit_dispatches = run_recorded(fn, "jit")
    first, _ = run_recorded(fn, "cached")
    cached, cached_dispatches = run_recorded(fn, "cached")
    assert jit, "no launch recorded"
    assert jit_dispatches == len(jit), (jit_dispatches, len(jit))
    assert first == jit, "first cached run differs from the dispatcher's launches"
    assert cached == jit, f"cached launches differ from the dispatcher's: {cached} vs {jit}"
    assert cached_dispatches == 0, f"{cached_dispatches} of {len(cached)} launches went through the dispatcher"
    return jit


def rnd(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def op_calls():
    """One call per launch site (forward and backward where the op has one)."""
    x, w, b = rnd(6, 40, grad=True), rnd(24, 40), rnd(24)
    a, bb = rnd(8, 40, grad=True), rnd(24, 8, grad=True)
    mag = rnd(24).abs() + 0.5
    slots = torch.tensor([0, 1, -1, 0, 1, 1])
    a_stack, b_stack = rnd(2, 8, 40), rnd(2, 24, 8)
    ranks, scal = torch.tensor([8, 4], dtype=torch.int32), torch.tensor([0.5, 2.0])

    def lora(p):
        return lambda: K.lora_linear_triton(x, w, b, a, bb, 0.5, p).sum().backward()

    def dora():
        K.dora_linear_triton(None, x, b, a, bb, 0.5, mag, w).sum().backward()

    def dora_dropout():
        K.dora_dropout_linear_triton(x, w, b, a, bb, 0.5, mag, 0.1).sum().backward()

    def multi(fused):
        meta = K.make_lora_batch_meta(slots, 2, validate=False)
        return lambda: K.multi_lora_triton(x.detach(), rnd(6, 24), a_stack, b_stack, ranks, scal, meta, fused=fused)

    def grouped():
        meta = K.experts_meta(torch.tensor([1, 0, 1, 1, 0, 0]), 2)
        K.grouped_lora_triton(x, rnd(2, 8, 40, grad=True), rnd(2, 24, 8, grad=True), 0.5, meta).sum().backward()

    def nf4():
        packed, state = K.nf4_quantize_triton(rnd(24, 64), 64, compress_statistics=True)
        K.nf4_dequantize_triton(packed, state)
        K.nf4_gemv_triton(rnd(2, 64), packed, state, None)
        K.qlora_linear_triton(rnd(3, 64, grad=True), packed, state, None, rnd(8, 64, grad=True),
                              rnd(24, 8, grad=True), 0.5, 0.1).sum().backward()
        K.dora_norm_nf4_triton(packed, state, rnd(8, 64), rnd(24, 8), 0.5)

    def decode():
        with torch.no_grad():
            K.lora_linear_triton(x[:4], w, b, a, bb, 0.5, 0.0)
            K.lora_linear_triton(x[:4].to(torch.bfloat16), w.to(torch.bfloat16), None, a, bb, 0.5, 0.0)
            K.dora_linear_triton(None, x[:4], b, a, bb, 0.5, mag, w)

    return {"lora": lora(0.0), "lora dropout": lora(0.1), "lora decode": decode, "dora": dora, "dora dropout": dora_dropout,
            "dora norm": lambda: K.dora_norm_triton(w, a.detach(), bb.detach(), 0.5),
            "multi-lora fused": multi(True), "multi-lora shrink+expand": multi(False), "grouped": grouped, "nf4": nf4}


def mm_call(a, b, c):
    return lambda: lora_mm.mm(a, b, c)


def handles(fn, mode):
    return [h for _, h, *_ in run_recorded(fn, mode)[0]]


def respecializes():
    """Calls that make Triton compile another specialization get the dispatcher's kernel, not the cached one."""
    a, b, c = rnd(17, 64), rnd(64, 8), torch.empty(17, 8)
    base = handles(mm_call(a, b, c), "cached") and handles(mm_call(a, b, c), "cached")
    variants = {
        "misaligned input": mm_call(rnd(18, 64)[1:], b, c),  # 256-byte offset: still aligned; below, 4 bytes
        "misaligned by 4 bytes": mm_call(rnd(17 * 64 + 1)[1:].view(17, 64), b, c),
        "16 rows": mm_call(rnd(16, 64), b, torch.empty(16, 8)),
        "1 row": mm_call(rnd(1, 64), b, torch.empty(1, 8)),
        "float64": mm_call(a.double(), b.double(), c.double()),
    }
    distinct = set()
    for name, fn in variants.items():
        want = handles(fn, "jit")
        handles(fn, "cached")
        got = handles(fn, "cached")
        assert got == want, f"{name}: cached kernel {got} is not the dispatcher's {want}"
        distinct.add(tuple(got))
    assert len(distinct - {tuple(base)}) >= 4, "the variants should need kernels of their own"


def device_and_stream():
    a, b, c = rnd(5, 64), rnd(64, 8), torch.empty(5, 8)
    first = run_recorded(mm_call(a, b, c), "cached")[0]
    FAKE.device = 1
    try:
        jit = run_recorded(mm_call(a, b, c), "jit")[0]
        run_recorded(mm_call(a, b, c), "cached")
        cached, n = run_recorded(mm_call(a, b, c), "cached")
    finally:
        FAKE.device = 0
    assert cached == jit and n == 0, (cached, jit, n)
    assert cached[0][3] == FAKE.stream + 1 != first[0][3], "the launch must take the current device's stream"
    assert cached[0][1] != first[0][1], "device 1 must get its own loaded kernel"


def hooks():
    a, b, c = rnd(5, 64), rnd(64, 8), torch.empty(5, 8)
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # noqa: E731
    run_recorded(mm_call(a, b, c), "cached")
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _, n = run_recorded(mm_call(a, b, c), "cached")
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert n == 1 and seen == ["_lora_mm_kernel"], (n, seen)


def jit_setting():
    """PEFT_FAST_LAUNCH=jit, and a Triton release outside VERIFIED_TRITON, launch through the dispatcher."""
    a, b, c = rnd(5, 64), rnd(64, 8), torch.empty(5, 8)
    for _ in range(3):
        launches, n = run_recorded(mm_call(a, b, c), "jit")
        assert n == len(launches) == 1
    saved, L.CACHEABLE = L.CACHEABLE, False
    try:
        for _ in range(3):
            launches, n = run_recorded(mm_call(a, b, c), "cached")
            assert n == len(launches) == 1
    finally:
        L.CACHEABLE = saved


@triton.jit
def _probe_kernel(x_ptr, n, BLOCK: tl.constexpr, ADD: tl.constexpr):  # n unused: a pointer or an int compiles
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + ADD)


def layouts():
    """A tensor where the first launch had an int, and launches the cache cannot lay out (constexprs by keyword
    out of signature order), go through the dispatcher every time; constexprs given positionally are cached."""
    x = torch.zeros(16)

    def probe(*args, **consts):
        REC.launches.clear()
        DISPATCHES[0] = 0
        L.launch(_probe_kernel, (1,), *args, **consts)
        return DISPATCHES[0]

    assert probe(x, 5, BLOCK=16, ADD=1) == 1 and probe(x, 5, BLOCK=16, ADD=1) == 0
    assert probe(x, 5, BLOCK=16, ADD=2) == 1 and probe(x, 5, BLOCK=16, ADD=2) == 0, "a constexpr's value is ignored"
    assert probe(x, x, BLOCK=16, ADD=1) == 1 and probe(x, x, BLOCK=16, ADD=1) == 1, "a tensor in an int's place"
    L.reset()
    assert probe(x, 5, 16, 1) == 1 and probe(x, 5, 16, 1) == 0
    assert REC.launches[0][4] == (x, 5, 16, 1), REC.launches[0][4]
    L.reset()
    assert probe(x, 5, ADD=1, BLOCK=16) == 1 and probe(x, 5, ADD=1, BLOCK=16) == 1, "keywords out of order"
    L.reset()


_PROBE_OFFSET = tl.constexpr(1.0)


@triton.jit
def _global_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + _PROBE_OFFSET)


def _probe(*args, grid=(1,), **consts):
    return lambda: L.launch(_probe_kernel, grid, *args, **consts)


def _sequence_matches(calls) -> None:
    """Each call in turn, through the cache, launches what the dispatcher launches: a cache hit on an earlier call's
    entry (a key that misses something Triton specializes on) shows as another kernel or other arguments."""
    L.reset()
    for call in calls:
        want = run_recorded(call, "jit")[0]
        for _ in range(2):
            got = run_recorded(call, "cached")[0]
            assert got == want, f"cached {got} vs dispatcher {want}"


def scalar_types():
    """2 and 2.0, 1, 1.0 and True, 0 and False are equal keys for a dict but compile to different kernels."""
    x = torch.zeros(16)
    _sequence_matches([_probe(x, v, BLOCK=16, ADD=1) for v in (2, 2.0, 1, 1.0, True, 0, False, 2**40)])


def dtypes_and_alignment():
    """Only a tensor's dtype changes, then only its address: by 8 bytes, by 4 bytes."""
    base = torch.zeros(64)
    _sequence_matches([_probe(t, 5, BLOCK=16, ADD=1) for t in (base[:16], base.half()[:16], base[2:18], base[1:17])])


def keyword_orders():
    """Constexprs by keyword in another order than the first launch's, and a non-constexpr by keyword."""
    x = torch.zeros(16)
    _sequence_matches([_probe(x, 5, BLOCK=16, ADD=1), _probe(x, 5, ADD=1, BLOCK=16), _probe(x, 5, ADD=2, BLOCK=16)])
    L.reset()
    _sequence_matches([_probe(x, n=5, BLOCK=16, ADD=1), _probe(x, 5, BLOCK=16, ADD=1)])
    L.reset()
    for _ in range(2):
        assert run_recorded(_probe(x, n=5, BLOCK=16, ADD=1), "cached")[1] == 1, "a keyword n must keep the dispatcher"


def triton_switches():
    """Triton's debug switch and its instrumentation options change the compiled kernel."""
    x = torch.zeros(16)
    call = _probe(x, 5, BLOCK=16, ADD=1)
    switches = [(knobs.runtime, "debug", True), (knobs.compilation, "instrumentation_mode", "fpsan"),
                (knobs.compilation, "fpsan_homomorphic_casts", True)]
    tried = 0
    for obj, name, value in switches:
        if not hasattr(obj, name):
            continue  # not in this Triton release
        L.reset()
        run_recorded(call, "cached")
        old = getattr(obj, name)
        setattr(obj, name, value)
        try:
            try:
                want = run_recorded(call, "jit")[0]
            except Exception:  # noqa: BLE001 - a mode this Triton cannot compile here: nothing to compare
                continue
            tried += 1
            for _ in range(2):
                got = run_recorded(call, "cached")[0]
                assert got == want, f"{name}={value}: cached {got} vs dispatcher {want}"
        finally:
            setattr(obj, name, old)
    assert tried >= 1


def hook_kinds():
    """A launch hook set to None, to a plain function, or added to the exit chain."""
    x = torch.zeros(16)
    call = _probe(x, 5, BLOCK=16, ADD=1)
    run_recorded(call, "cached")
    runtime, seen = knobs.runtime, []
    for name in ("launch_enter_hook", "launch_exit_hook"):
        old = getattr(runtime, name)
        try:
            setattr(runtime, name, None)
            assert run_recorded(call, "cached")[1] == 0, f"{name}=None"
            setattr(runtime, name, lambda metadata: seen.append(name))
            launches, n = run_recorded(call, "cached")
            assert n == 1 and launches, f"{name} as a function must keep the dispatcher"
        finally:
            setattr(runtime, name, old)
    hook = lambda metadata: seen.append("exit chain")  # noqa: E731
    runtime.launch_exit_hook.add(hook)
    try:
        assert run_recorded(call, "cached")[1] == 1
    finally:
        runtime.launch_exit_hook.remove(hook)
    _probe_kernel.add_pre_run_hook(lambda *args, **kwargs: seen.append("pre-run"))
    try:
        assert run_recorded(call, "cached")[1] == 1 and seen[-1] == "pre-run", "a pre-run hook must keep the dispatcher"
    finally:
        _probe_kernel.pre_run_hooks.clear()
    assert run_recorded(call, "cached")[1] == 0


def changed_global():
    """The dispatcher refuses a kernel whose global constexpr changed since it compiled; so must the cache."""
    global _PROBE_OFFSET
    x = torch.zeros(16)
    call = lambda: L.launch(_global_kernel, (1,), x, BLOCK=16)  # noqa: E731
    for _ in range(2):
        run_recorded(call, "cached")
    saved, _PROBE_OFFSET = _PROBE_OFFSET, tl.constexpr(2.0)
    try:
        for mode in ("jit", "cached"):
            try:
                run_recorded(call, mode)
            except RuntimeError as e:
                assert "changed" in str(e), e
            else:
                raise AssertionError(f"{mode}: a changed global was launched")
    finally:
        _PROBE_OFFSET = saved


def bounded_and_callable_grid():
    x = torch.zeros(16)
    saved, L._MAX_ENTRIES = L._MAX_ENTRIES, 8
    try:
        L.reset()
        for n in range(20):
            run_recorded(_probe(x, n + 2, BLOCK=16, ADD=1), "cached")
        layout = L._layouts[id(_probe_kernel)]
        assert 0 < len(layout.compiled) <= 8, len(layout.compiled)
    finally:
        L._MAX_ENTRIES = saved
    for _ in range(2):
        launches, n = run_recorded(_probe(x, 5, grid=lambda meta: (3,), BLOCK=16, ADD=1), "cached")
        assert n == 1 and launches[0][2] == (3, 1, 1), (n, launches)


def stand_in():
    """Something other than a JIT function (the benchmarks' launch counters) is launched as fn[grid](...)."""
    calls = []

    class StandIn:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((grid, args, kw))

    L.launch(StandIn(), (2, 1), 1, 2, X=3)
    assert calls == [((2, 1), (1, 2), {"X": 3})]


def verified():
    assert L.CACHEABLE, (f"Triton {triton.__version__} is outside launch.VERIFIED_TRITON {L.VERIFIED_TRITON}: if this "
                         "worker's other checks pass on it, extend VERIFIED_TRITON")


def main(out: Path) -> None:
    results = {}
    checks = {"verified triton": verified}
    checks.update({f"same as dispatcher: {name}": (lambda f=f: same_as_dispatcher(f)) for name, f in op_calls().items()})
    checks.update({"scalar types": scalar_types, "dtypes and alignment": dtypes_and_alignment,
                   "keyword orders": keyword_orders, "triton switches": triton_switches, "hook kinds": hook_kinds,
                   "changed global": changed_global, "bounded cache, callable grid": bounded_and_callable_grid})
    checks.update({"respecializes": respecializes, "device and stream": device_and_stream, "hooks": hooks,
                   "jit setting": jit_setting, "layouts": layouts, "stand-in": stand_in})
    for name, check in checks.items():
        try:
            check()
            results[name] = None
        except Exception:  # noqa: BLE001 - every failure is reported by name
            results[name] = traceback.format_exc(limit=4)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    main(Path(sys.argv[1]))
