"""The fused decoder's operations, by backend. Each backend gives the same five functions with transformers'
semantics; `patching.py` decides where they go.

- ``"liger"``: Liger-Kernel's Triton kernels (``pip install "peft-fast[fused]"``, CUDA tensors).
- ``"compile"``: transformers' own code for each op, compiled by ``torch.compile`` (Inductor fuses each into one or
  two kernels, forward and backward), plus the chunked loss of ``loss.py`` with its per-chunk step compiled. Needs
  nothing beyond torch, and runs on CPUs too.
"""
from __future__ import annotations

import functools
import importlib.util
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

from peft_fast.fused import loss as loss_ops

BACKENDS = ("liger", "compile")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """Llama's RMSNorm (normalise in float32, cast, then scale) or Gemma's (scale by 1 + w in float32, then cast)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(x.dtype)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gelu_tanh_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


def _shared(fn: Callable, tag: str) -> Callable:
    return fn


@dataclass(frozen=True, eq=False)  # hashed by identity: one per backend
class Ops:
    name: str
    rms_norm: Callable  # (x, weight, eps, gemma) -> y
    glu: dict  # activation name (transformers' ACT2FN key) -> (gate, up) -> act(gate) * up
    rope: Callable  # (the model's apply_rotary_pos_emb) -> its fused replacement
    causal_lm_loss: Callable  # (hidden, head weight, labels, *, ignore_index, shift_labels, num_items_in_batch,
    #                           softcap) -> the loss
    # (rms_norm or a glu function, a module class's name) -> what that class's fused forward calls
    per_class: Callable = _shared


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=None)


def compiled_copy(fn: Callable, tag: str) -> Callable:
    """`fn` compiled with a dynamo cache of its own: dynamo keys its cache (and its recompile limit) on the code
    object, so each copy of the code gets one."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}", co_qualname=f"{fn.__qualname__}_{tag}")
    return _compiled(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__))


@functools.lru_cache(maxsize=None)
def _compiled_rope(apply_rotary_pos_emb: Callable) -> Callable:
    return _compiled(apply_rotary_pos_emb)


@functools.lru_cache(maxsize=None)
def compile_ops() -> Ops:
    # AOTAutograd's donated buffers (a compiled backward freeing its saved tensors) refuse a second backward
    # (`retain_graph=True`, `create_graph=True`), which the unfused modules take. The flag is global (read where
    # graphs compile and again at each backward), so the compile backend turns it off for the process (README).
    functorch_config.donated_buffer = False
    compiled_step = _compiled(loss_ops.chunk_step)

    def step(*args):  # a plain function around it: torch 2.11's compile breaks on a compiled one given to apply
        return compiled_step(*args)

    # Norms and activations are compiled once per module class (per_class): one shared compiled function would
    # pool every model's norms in one dynamo cache and its recompile limit.
    return Ops(name="compile", rms_norm=rms_norm_reference,
               glu={"silu": silu_mul_reference, "swish": silu_mul_reference,
                    "gelu_pytorch_tanh": gelu_tanh_mul_reference},
               rope=_compiled_rope, causal_lm_loss=functools.partial(loss_ops.causal_lm_loss, step=step),
               per_class=compiled_copy)


@functools.lru_cache(maxsize=None)
def liger_ops() -> Ops:
    from liger_kernel.transformers.functional import liger_geglu, liger_rms_norm, liger_rope, liger_swiglu
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss

    def rms_norm(x, weight, eps, gemma):
        # in_place=False: the residual stream's gradient reaches the norm and the skip connection both.
        if gemma:
            return liger_rms_norm(x, weight, eps, offset=1.0, casting_mode="gemma", in_place=False)
        y = liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)
        # Llama's norm returns weight * x.to(x.dtype): the promoted dtype (float32 weights after kbit preparation)
        out = torch.promote_types(x.dtype, weight.dtype)
        return y if y.dtype == out else y.to(out)

    def causal_lm_loss(hidden, weight, labels, *, ignore_index=-100, shift_labels=None, num_items_in_batch=None,
                       softcap: Optional[float] = None, **_):
        return LigerForCausalLMLoss(hidden, weight, labels, hidden.shape[-1], num_items_in_batch=num_items_in_batch,
                                    ignore_index=ignore_index, shift_labels=shift_labels,
                                    final_logit_softcapping=softcap)

    return Ops(name="liger", rms_norm=rms_norm,
               glu={"silu": liger_swiglu, "swish": liger_swiglu, "gelu_pytorch_tanh": liger_geglu},
               rope=lambda _apply_rotary_pos_emb: liger_rope, causal_lm_loss=causal_lm_loss)


def resolve(backend, device: torch.device) -> Optional[str]:
    """The backend name for `fused=` (None when off); a bad value is refused before anything changes."""
    if backend is None or backend is False:
        return None
    if backend is True or backend == "auto":
        return "liger" if device.type == "cuda" and liger_available() else "compile"
    if backend not in BACKENDS:
        raise ValueError(f"fused={backend!r} is not a fused-decoder backend: use one of {BACKENDS}, True/'auto' "
                         "(Liger-Kernel on CUDA when installed, else torch.compile) or None/False (off).")
    if backend == "liger":
        if not liger_available():
            raise ImportError("fused='liger' needs Liger-Kernel: pip install \"peft-fast[fused]\" (or "
                              "liger-kernel), or use fused='compile', which needs only torch.")
        if device.type != "cuda":
            raise ValueError(f"fused='liger' runs Liger-Kernel's Triton kernels, which need CUDA tensors; this model "
                             f"is on {device.type}. Move it to a GPU first, or use fused='compile'.")
    return backend


def ops_for(name: str) -> Ops:
    return liger_ops() if name == "liger" else compile_ops()
