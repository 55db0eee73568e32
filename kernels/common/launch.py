"""Launching a Triton kernel without Triton's dispatcher on every call.

`fn[grid](*args, **consts)` runs Triton's JIT dispatcher each time: it binds every argument, specializes each one,
builds and hashes a cache key, checks globals and builds launch metadata before the compiled kernel's launcher runs.
That is about 15 µs per launch on this project's CPUs against 5-6 µs through the cache (`bench/host_overhead.py
--device fake`), several times per layer and step. `launch` goes through the dispatcher once per argument
fingerprint, keeps the compiled kernel it returns, and from then on calls that kernel's launcher directly.

The fingerprint holds everything Triton specializes a compiled kernel on: every non-tensor argument's type and value
(ints are specialized on == 1, divisibility by 16 and width; 1, 1.0 and True compile differently), each tensor's
dtype and 16-byte alignment, the constexprs and launch options by name, the current device, Triton's debug switch
and its instrumentation options. Calls with equal fingerprints therefore get the kernel Triton's own cache would
return. The dispatcher still runs under the interpreter, for stand-ins (benchmarks' launch counters), with
PEFT_FAST_LAUNCH=jit, on Triton releases outside VERIFIED_TRITON, for callable grids, whenever it has more to do
than choose a kernel (launch or pre-run hooks, a stage-inspection hook, a changed global), and for a call whose
arguments the cache cannot lay out (see `_Layout`). tests/kernels/test_launch.py checks all of this against the
dispatcher on a stand-in GPU.
"""
from __future__ import annotations

import threading
from typing import Any

from . import settings
from .backend import HAS_TRITON

_MAX_ENTRIES = 4096  # distinct fingerprints per kernel before its cache starts over (token counts vary)
# Triton releases whose dispatcher hands the compiled kernel's launcher exactly what `launch` hands it (checked by
# tests/kernels/test_launch.py on 3.6, the GPU machine's, and 3.9, CI's); others keep the dispatcher.
VERIFIED_TRITON = frozenset({(3, 6), (3, 9)})

if HAS_TRITON:
    import triton
    from triton import knobs
    from triton.knobs import HookChain
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    CACHEABLE = tuple(int(p) for p in triton.__version__.split(".")[:2]) in VERIFIED_TRITON
    # knobs that only some of the verified releases have (3.9): looked up once, not per launch
    _INSPECTION_HOOK = hasattr(knobs.runtime, "add_stages_inspection_hook")
    _FPSAN = hasattr(knobs.compilation, "fpsan_homomorphic_casts")
else:  # pragma: no cover - platforms without triton never launch kernels
    JITFunction, CACHEABLE = (), False
_MISSING = object()


class _Layout:
    """Where one kernel's tensors are among its positional arguments, learnt from its first launch.

    Only launches that pass the kernel's non-constexpr parameters positionally and every constexpr by keyword in
    signature order (then launch options such as num_warps) are cached: the launcher takes the parameters in
    signature order, so a fingerprint is kept only for a call laid out that way."""

    __slots__ = ("fn", "n_args", "const_names", "tensor_at", "fingerprint", "compiled", "stream", "device")

    def __init__(self, fn, n_args: int, tensor_at: tuple[int, ...]):
        self.fn, self.n_args, self.tensor_at = fn, n_args, tensor_at
        self.const_names = list(fn.arg_names[n_args:])
        self.fingerprint = _fingerprint(n_args, tensor_at)
        self.compiled: dict[tuple, Any] = {}
        self.device = driver.active.get_current_device
        self.stream = driver.active.get_current_stream

    def matches(self, args: tuple, consts: dict) -> bool:
        """The layout of the first launch: tensors at the same places, the constexprs in signature order."""
        return (len(args) == self.n_args and list(consts)[:len(self.const_names)] == self.const_names
                and all(_is_tensor(a) == (i in self.tensor_at) for i, a in enumerate(args)))


def _fingerprint(n_args: int, tensor_at: tuple[int, ...]):
    """args -> one tuple: each tensor's dtype and 16-byte alignment, every other argument's type and value (1,
    1.0 and True are equal but compile to different kernels). Generated once per kernel: a Python loop over ~30
    arguments would cost a good part of the dispatcher work it saves."""
    items = "".join((f"a[{i}].dtype, a[{i}].data_ptr() & 15 == 0, " if i in tensor_at
                     else f"a[{i}].__class__, a[{i}], ") for i in range(n_args))
    namespace: dict = {}
    exec(f"def fingerprint(a):\n    return ({items})\n", namespace)  # noqa: S102 - source built above from ints
    return namespace["fingerprint"]


_layouts: dict[int, _Layout | None] = {}  # id(fn) -> layout, which holds fn: an id is never reused while here
_lock = threading.Lock()


def _is_tensor(a) -> bool:
    return hasattr(a, "data_ptr") and hasattr(a, "dtype")


def _learn(fn, args: tuple, consts: dict) -> _Layout | None:
    """The layout of fn's launches, or None when they cannot be cached (the dispatcher then runs every time)."""
    names, n = list(fn.arg_names), len(args)
    if n > len(names) or not all(p.is_constexpr for p in fn.params[n:]):
        return None
    layout = _Layout(fn, n, tuple(i for i, a in enumerate(args) if _is_tensor(a)))
    return layout if layout.matches(args, consts) else None


def _globals_changed(fn) -> bool:
    return any(g.get(name, _MISSING) != val for (name, _), (val, g) in fn.used_global_vals.items())


def _dispatch(fn, layout: _Layout, key, grid, args: tuple, consts: dict) -> None:
    """Launch through Triton's dispatcher and keep the compiled kernel it used under `key`."""
    kernel = fn.run(*args, grid=grid, warmup=False, **consts)
    if key is None or getattr(kernel, "function", None) is None or not layout.matches(args, consts):
        return
    with _lock:
        if len(layout.compiled) >= _MAX_ENTRIES:
            layout.compiled.clear()
        layout.compiled[key] = kernel


def launch(fn, grid: tuple, *args, **consts) -> None:
    """`fn[grid](*args, **consts)`, through the compiled kernel once an equal fingerprint of arguments went through
    Triton's dispatcher."""
    if not CACHEABLE or type(fn) is not JITFunction or settings.current().launch != "cached" or callable(grid):
        fn[grid](*args, **consts)
        return
    layout = _layouts.get(id(fn), False)
    if layout is False or (layout is not None and layout.fn is not fn):
        with _lock:
            layout = _layouts[id(fn)] = _learn(fn, args, consts)
    # What the dispatcher does besides choosing a kernel keeps it: launch hooks (profilers read its metadata; a
    # HookChain without calls is Triton's idle default), pre-run hooks, a stage-inspection hook, and its check that
    # no global a kernel read has changed since it compiled (it raises then).
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if (layout is None or len(args) != layout.n_args
            or (enter is not None and (enter.__class__ is not HookChain or enter.calls))
            or (leave is not None and (leave.__class__ is not HookChain or leave.calls))
            or fn.pre_run_hooks or (_INSPECTION_HOOK and runtime.add_stages_inspection_hook is not None)
            or (fn.used_global_vals and _globals_changed(fn))):
        fn.run(*args, grid=grid, warmup=False, **consts)
        return
    try:
        fingerprint = layout.fingerprint(args)
    except AttributeError:  # something other than a tensor where the first launch had one
        fn.run(*args, grid=grid, warmup=False, **consts)
        return
    device = layout.device()
    compilation = knobs.compilation  # the dispatcher's options: a switch compiles other kernels
    key = (device, runtime.debug, compilation.instrumentation_mode,
           compilation.fpsan_homomorphic_casts if _FPSAN else None, fingerprint, tuple(consts.items()))
    try:
        kernel = layout.compiled.get(key)
    except TypeError:  # an unhashable argument: the dispatcher decides
        kernel, key = None, None
    if kernel is None:
        _dispatch(fn, layout, key, grid, args, consts)
        return
    n = len(grid)
    kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, layout.stream(device), kernel.function,
               kernel.packed_metadata, None, None, None, *args, *tuple(consts.values())[:len(layout.const_names)])


def reset() -> None:
    """Forget every cached kernel and layout (tests that swap Triton's driver)."""
    with _lock:
        _layouts.clear()
