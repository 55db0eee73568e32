"""The one dispatch rule shared by every op: which implementation runs for given tensors.

backend "auto" (default): CUDA tensors -> Triton, anything else -> the PyTorch reference.
backend "torch": the reference everywhere. backend "triton": Triton everywhere; CPU tensors then run under the
Triton interpreter (settings.py switches it on at import when PEFT_FAST_BACKEND=triton and there is no GPU).
"""
from __future__ import annotations

import torch

from . import settings

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # macOS / Windows wheels of torch come without triton
    HAS_TRITON = False


def backend() -> str:
    return settings.current().backend


def interpreting() -> bool:
    return settings.current().interpret


def functorch_active() -> bool:
    """Inside torch.func transforms (vmap, grad, jacrev, ...): the Triton ops' autograd functions and raw data
    pointers cannot run on their wrapped tensors, while the references are plain torch ops that they transform."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def keeps_no_state() -> bool:
    """Traced (torch.compile) or transformed (torch.func) code: caches are neither read nor written there (traced
    code keeps nothing; transformed tensors have no storage to key a cache on, and may be per-sample)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton implementation should run for these tensors."""
    s = settings.current()
    if s.backend == "torch" or not HAS_TRITON or functorch_active():
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if s.backend == "triton":
        if not on_cuda and not s.interpret:
            raise RuntimeError(
                "PEFT_FAST_BACKEND=triton with CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing peft_fast (or move the tensors to a GPU)."
            )
        return True
    return on_cuda and not s.interpret
