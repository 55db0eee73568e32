"""The one dispatch rule shared by every op: which implementation runs for given tensors.

PEFT_FAST_BACKEND=auto (default): CUDA tensors -> Triton, anything else -> the PyTorch reference.
PEFT_FAST_BACKEND=torch: the reference everywhere.
PEFT_FAST_BACKEND=triton: Triton everywhere; CPU tensors then run under the Triton interpreter,
which must be switched on before the kernels are decorated, so we switch it on here, at import.
"""
from __future__ import annotations

import os

import torch

_VALID = ("auto", "torch", "triton")


def backend() -> str:
    name = os.environ.get("PEFT_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in _VALID:
        raise ValueError(f"PEFT_FAST_BACKEND={name!r} is not one of {_VALID}; unset it or pick one of those.")
    return name


if backend() == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # macOS / Windows wheels of torch come without triton
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton implementation should run for these tensors."""
    name = backend()
    if name == "torch" or not HAS_TRITON:
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in present)
    if name == "triton":
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "PEFT_FAST_BACKEND=triton with CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing peft_fast (or move the tensors to a GPU)."
            )
        return True
    return on_cuda and not interpreting()
