"""peft_fast's switches: read from the environment once, at import, into one immutable `Settings`.

| variable             | values                     | effect                                                                 |
|----------------------|----------------------------|------------------------------------------------------------------------|
| PEFT_FAST_BACKEND    | auto (default), torch, triton | which implementation runs (see backend.py)                          |
| PEFT_FAST_LORA_DOT   | half (default), fp32       | 16-bit activations: LoRA dots in that 16-bit type, or in float32       |
| PEFT_FAST_NF4_DECODE | dequant (default), gemv    | 4-bit matmuls of <= 16 rows: dequantize + cuBLAS, or the NF4 GEMV      |
| PEFT_FAST_LAUNCH     | cached (default), jit      | Triton launches through their cached compiled kernels (launch.py), or  |
|                      |                            | through Triton's dispatcher on every call                              |
| TRITON_INTERPRET     | 1 or unset                 | Triton kernels run on the CPU interpreter (set before kernels load)    |

This is the only module that reads `os.environ`. Everything else asks `current()`, whose value is one object
until `configure` / `override` replace it: layers key their launch plans on it, so a switch takes effect at the
next call without any per-call parsing. A bad value fails at import with a message naming the variable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

BACKENDS = ("auto", "torch", "triton")
LORA_DOTS = ("half", "fp32")
NF4_DECODES = ("dequant", "gemv")
LAUNCHES = ("cached", "jit")


@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    lora_dot: str = "half"
    interpret: bool = False
    nf4_decode: str = "dequant"
    launch: str = "cached"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend (PEFT_FAST_BACKEND) = {self.backend!r} is not one of {BACKENDS}; unset it or "
                             "pick one of those.")
        if self.lora_dot not in LORA_DOTS:
            raise ValueError(f"lora_dot (PEFT_FAST_LORA_DOT) = {self.lora_dot!r} is not one of {LORA_DOTS}; unset it or "
                             "pick one of those.")
        if self.nf4_decode not in NF4_DECODES:
            raise ValueError(f"nf4_decode (PEFT_FAST_NF4_DECODE) = {self.nf4_decode!r} is not one of {NF4_DECODES}; "
                             "unset it or pick one of those.")
        if self.launch not in LAUNCHES:
            raise ValueError(f"launch (PEFT_FAST_LAUNCH) = {self.launch!r} is not one of {LAUNCHES}; unset it or "
                             "pick one of those.")
        # Settings key caches read on every kernel call (launch configs, plans): hash them once.
        object.__setattr__(self, "_hash", hash((self.backend, self.lora_dot, self.interpret, self.nf4_decode,
                                                   self.launch)))

    def __hash__(self) -> int:
        return self._hash


def _from_environment() -> Settings:
    def get(name: str, default: str) -> str:
        return os.environ.get(name, default).strip().lower() or default

    backend = get("PEFT_FAST_BACKEND", "auto")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") is None:
        # Triton everywhere on a machine without a GPU needs the interpreter, and Triton picks it when a kernel is
        # decorated: switch it on now, before any kernel module is imported.
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    return Settings(backend=backend, lora_dot=get("PEFT_FAST_LORA_DOT", "half"),
                    interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
                    nf4_decode=get("PEFT_FAST_NF4_DECODE", "dequant"), launch=get("PEFT_FAST_LAUNCH", "cached"))


_current = _from_environment()


def current() -> Settings:
    return _current


def configure(**changes) -> Settings:
    """Replace settings from now on (e.g. `configure(backend="torch")`); returns the previous ones. The interpreter
    cannot be switched after import: Triton chose it when the kernels were decorated."""
    global _current
    if "interpret" in changes and changes["interpret"] != _current.interpret:
        raise ValueError("TRITON_INTERPRET is fixed once the kernels are imported; set it before importing peft_fast.")
    previous, _current = _current, dataclasses.replace(_current, **changes)
    return previous


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """`with override(backend="torch"): ...` for a block of code (tests, benchmarks)."""
    global _current
    previous = configure(**changes)
    try:
        yield _current
    finally:
        _current = previous
