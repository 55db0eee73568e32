"""Prove, without a GPU, that every Triton kernel in peft_fast.kernels compiles for an H100/H200 (sm_90) with the
GPU machine's Triton (3.6), for exactly the specializations the code launches.

Usage: .venv/bin/python bench/compile_check.py [--tests tests/kernels] [--triton-dir /tmp/triton36]
                                               [--records /tmp/pf_launches.json] [--skip-record]

1. Record (this venv's Triton, interpreter): run the kernel tests in-process and note every launch
   `kernel[grid](...)` as one specialization: pointer dtypes and 16-byte alignment, int width / divisibility by 16
   / ==1 (Triton specializes on all three), constexpr values, launch options (num_warps, enable_fp_fusion, ...).
   Twice: as the interpreter runs, and with the GPU's choice of dot dtype (see record), which the interpreter
   never makes (the kernels still run with float32 dots there: the interpreter's 16-bit tl.dot is wrong).
2. Compile (a subprocess with an unpacked Triton 3.6 wheel first on PYTHONPATH, no interpreter): rebuild stand-in
   arguments, let Triton 3.6's own launch binder turn them into signature / constexprs / attrs / options (so the
   specialization is the one a real launch would compile), and run triton.compile for GPUTarget("cuda", 90, 32)
   down to cubin with the wheel's bundled ptxas. A kernel whose shared memory exceeds sm_90's per-block limit would
   compile but fail at launch (OutOfResources), so that counts as a failure too.
Exits non-zero if a specialization fails or a kernel is never launched by the tests.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import types
import zipfile

# Never import from bench/ or the repo root: the top-level kernels/ would shadow Hugging Face's `kernels` package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_VERSION = "3.6.0"
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "uint8": "u8", "int8": "i8",
          "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1"}  # torch dtype name -> Triton pointee
SM90_MAX_SHARED = 232448  # bytes per block with opt-in (227 KB): more and the launch raises OutOfResources


def is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)  # tl.constexpr, or the string "tl.constexpr" (future annotations)


def arg_token(v):
    """A non-constexpr argument as the class Triton specializes it on, e.g. "*bf16:16", "i32", "i64:16", "1"."""
    if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
        return f"*{DTYPES[str(v.dtype).removeprefix('torch.')]}" + (":16" if v.data_ptr() % 16 == 0 else "")
    if v is None or isinstance(v, bool):
        return v  # None is a constexpr; a bool is an i1, never specialized
    if isinstance(v, int):
        if v == 1:
            return "1"  # Triton turns an int argument equal to 1 into a constexpr
        ty = "i32" if -2**31 <= v < 2**31 else "i64" if -2**63 <= v < 2**63 else "u64"
        return ty + (":16" if v % 16 == 0 else "")
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {v!r}")


def record(tests: str, out_path: str, gpu_dots: bool) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # Triton picks the interpreter when kernels are decorated: before import
    import dataclasses

    import pytest
    from triton.runtime.interpreter import InterpretedFunction

    from peft_fast.kernels.common.dot_policy import DOT_F32, DOT_F64

    if gpu_dots:
        # Under the interpreter dot_mode always picks float32 dots (its bf16 tl.dot is broken), so the tensor-core
        # specializations a GPU launches (DOT native / bf16 / fp16) never run. Let dot_mode alone answer as on a
        # GPU; recording_run records that choice but runs the kernel with float32 dots, so the tests still pass.
        from peft_fast.kernels.common import dot_policy, settings

        class GpuSettings:
            @staticmethod
            def current():
                return dataclasses.replace(settings.current(), interpret=False)

        dot_policy.settings = GpuSettings

    seen: dict = {}
    real_run = InterpretedFunction.run

    # Patch the class, not the module attributes: kernels look device functions (dot_operands, _code_of, ...) up
    # in their module's globals, so swapping those objects for recorders would break the interpreted kernels.
    def recording_run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("peft_fast.kernels"):
            params = inspect.signature(self.fn).parameters
            options = {k: kwargs[k] for k in kwargs if k not in params}  # num_warps, enable_fp_fusion, ...
            bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
            bound.apply_defaults()
            spec = {name: (v if is_constexpr(params[name]) else arg_token(v)) for name, v in bound.arguments.items()}
            key = json.dumps([self.fn.__module__, self.fn.__name__, list(spec.items()), sorted(options.items())])
            seen[key] = seen.get(key, 0) + 1
        if gpu_dots and kwargs.get("DOT") not in (None, DOT_F32, DOT_F64):
            kwargs["DOT"] = DOT_F32
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)  # outputs feed later launches: run it

    InterpretedFunction.run = recording_run
    os.chdir(REPO)  # pyproject.toml's pytest settings (importlib mode, pythonpath tests/helpers) apply from here
    rc = pytest.main([tests, "-q", "-p", "no:cacheprovider"])
    if rc not in (0, 1):  # 1 = some tests failed: their launches before the failure still count
        sys.exit(f"pytest could not run the tests (exit code {rc})")
    if rc == 1:
        print("WARNING: some tests failed; recording the launches that happened anyway", file=sys.stderr)
    recs = [dict(module=m, kernel=k, args=dict(a), options=dict(o), count=n)
            for (m, k, a, o), n in ((json.loads(key), n) for key, n in seen.items())]
    with open(out_path, "w") as f:
        json.dump(sorted(recs, key=lambda r: (r["module"], r["kernel"])), f, indent=1)
    print(f"recorded {sum(seen.values())} launches, {len(recs)} unique specializations -> {out_path}")


def fetch_triton(triton_dir: str) -> None:
    """Unpack the Triton wheel the GPU machine runs (it bundles ptxas and libdevice), once."""
    if os.path.isdir(os.path.join(triton_dir, "triton")):
        return
    with tempfile.TemporaryDirectory() as dl:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
                        "--platform", "manylinux_2_27_x86_64", f"triton=={TRITON_VERSION}", "-d", dl], check=True)
        (wheel,) = [os.path.join(dl, f) for f in os.listdir(dl) if f.endswith(".whl")]
        with zipfile.ZipFile(wheel) as z:
            z.extractall(triton_dir)
    for root, _, files in os.walk(os.path.join(triton_dir, "triton", "backends")):  # zip drops the exec bit
        for f in files:
            if "/bin" in root:
                os.chmod(os.path.join(root, f), 0o755)


def compile_all(records_path: str, verbose: bool) -> int:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    assert triton.__version__ == TRITON_VERSION, f"expected Triton {TRITON_VERSION}, got {triton.__version__}"
    import peft_fast.kernels  # noqa: F401  (loads every kernel module; needs no GPU)

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    torch_dtype = {v: getattr(torch, k) for k, v in DTYPES.items()}

    def value(token):  # a representative of the specialization class that arg_token recorded
        if not isinstance(token, str):
            return token  # None, bool
        if token == "1":
            return 1
        ty, _, div = token.partition(":")
        if ty.startswith("*"):
            # All the launch binder reads from a tensor: its dtype, and its address for the alignment.
            return types.SimpleNamespace(dtype=torch_dtype[ty[1:]], data_ptr=lambda: 0 if div else 8)
        if ty == "fp32":
            return 0.5
        return {"i32": 16, "i64": 2**32, "u64": 2**63}[ty] + (0 if div else 1)

    # Every JIT function of the package, to tell which were never launched (device functions are compiled inline).
    kernels = {(m, n): obj for m, mod in list(sys.modules.items()) if m.startswith("peft_fast.kernels")
               for n, obj in vars(mod).items() if isinstance(obj, JITFunction) and obj.fn.__module__ == m}
    with open(records_path) as f:
        recs = json.load(f)
    results = collections.defaultdict(list)  # kernel -> [error or None per specialization]
    start = time.time()
    for i, rec in enumerate(recs, 1):
        fn = kernels[(rec["module"], rec["kernel"])]
        is_cx = {p.name: p.is_constexpr for p in fn.params}
        args = {name: (tok if is_cx[name] else value(tok)) for name, tok in rec["args"].items()}
        t0 = time.time()
        try:  # what JITFunction.run does before compiling, minus the driver (there is no GPU here)
            kw = dict(rec["options"], debug=fn.debug or triton.knobs.runtime.debug,
                      instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
            bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
                **args, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
            if not k.asm.get("cubin"):
                raise RuntimeError("no cubin produced")
            if k.metadata.shared > SM90_MAX_SHARED:
                raise RuntimeError(f"needs {k.metadata.shared} B shared memory > sm_90's {SM90_MAX_SHARED} B: "
                                   "OutOfResources at launch")
            results[rec["kernel"]].append(None)
            if verbose:
                print(f"{rec['kernel']:<22} ok ({time.time() - t0:.1f}s, {len(k.asm['cubin'])} B cubin, "
                      f"{k.metadata.shared} B smem)", flush=True)
        except Exception as e:  # noqa: BLE001  (report every failure, keep going)
            lines = [ln for ln in str(e).splitlines() if ln.strip()] or [""]
            # A CompilationError starts with "at LINE:COL:" and the source; its message is its last line.
            first = lines[-1] if type(e).__name__ == "CompilationError" else lines[0]
            results[rec["kernel"]].append(f"{type(e).__name__}: {first}")
            print(f"\n=== FAILED {rec['kernel']} {json.dumps(rec['args'])} options={rec['options']}\n"
                  f"{type(e).__name__}: {e}\n", flush=True)
        if i % 50 == 0 or i == len(recs):
            print(f"compiled {i}/{len(recs)} specializations ({time.time() - start:.0f}s)", flush=True)

    names = sorted({n for _, n in kernels} | set(results))
    device_fns = {n for n in names if n not in results and any(
        f"{n}(" in inspect.getsource(o.fn) for o in kernels.values() if o.__name__ != n)}
    print(f"\nTriton {triton.__version__}, target cuda sm_90, compiled to cubin with "
          f"{triton.knobs.nvidia.ptxas.path}")
    print(f"{'kernel':<22} {'specs':>5} {'ok':>4} {'failed':>6}  first error")
    bad = 0
    for n in names:
        errs = results.get(n, [])
        failed = [e for e in errs if e]
        note = failed[0][:110] if failed else ""
        if not errs:
            note = "device function (compiled inside the kernels)" if n in device_fns else "NEVER LAUNCHED by tests"
            bad += n not in device_fns
        bad += len(failed)
        print(f"{n:<22} {len(errs):>5} {len(errs) - len(failed):>4} {len(failed):>6}  {note}")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", default="tests/kernels", help="pytest target, relative to the repo root")
    ap.add_argument("--triton-dir", default="/tmp/triton36", help=f"unpacked triton {TRITON_VERSION} wheel")
    ap.add_argument("--records", default=os.path.join(tempfile.gettempdir(), "pf_kernel_launches.json"))
    ap.add_argument("--skip-record", action="store_true", help="reuse --records from an earlier run")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per compiled specialization")
    for internal in ("--compile-only", "--record-only", "--gpu-dots"):  # the subprocesses' modes
        ap.add_argument(internal, action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.compile_only:
        sys.exit(compile_all(a.records, a.verbose))
    if a.record_only:
        return record(a.tests, a.records, a.gpu_dots)
    if not a.skip_record:  # two passes, each in a fresh process (launch configs are cached per settings)
        merged = {}
        for gpu_dots in (False, True):
            part = f"{a.records}.{'gpu_dots' if gpu_dots else 'interpreter'}"
            print(f"== record pass: {'GPU dot policy' if gpu_dots else 'as the interpreter runs'}", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--record-only", "--tests", a.tests,
                            "--records", part] + ["--gpu-dots"] * gpu_dots, check=True)
            with open(part) as f:
                for r in json.load(f):
                    key = json.dumps([r["module"], r["kernel"], r["args"], r["options"]])
                    merged.setdefault(key, dict(r, count=0))["count"] += r["count"]
        with open(a.records, "w") as f:
            json.dump(list(merged.values()), f, indent=1)
        print(f"{len(merged)} unique specializations in both passes -> {a.records}", flush=True)
    fetch_triton(a.triton_dir)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.abspath(a.triton_dir) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONSAFEPATH"] = "1"
    # A fresh process: the record pass's interpreter and its Triton 3.9 must not leak. A cold cache: compile each.
    with tempfile.TemporaryDirectory(prefix="pf_triton36_cache_") as env["TRITON_CACHE_DIR"]:
        rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-only", "--records", a.records]
                            + ["--verbose"] * a.verbose, env=env, cwd=tempfile.gettempdir()).returncode
    sys.exit(rc)


if __name__ == "__main__":
    main()
