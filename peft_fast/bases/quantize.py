"""peft_fast.quantize: turn a model's nn.Linear layers into 4-bit NF4Linear layers, and its mixture-of-experts stacks
into 4-bit stacks (nf4_experts.py), without bitsandbytes.

The linear layers get the same bytes as transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...)`
would give (kernels/nf4_quantize.py is bit for bit bitsandbytes' quantize_4bit), the same layers left dense (the
output embedding), and the same checkpoint keys; but no bitsandbytes and no CUDA are needed to quantize, and the
layers run on peft_fast's kernels. bitsandbytes leaves expert stacks 16-bit: a model whose stacks are 4-bit here
(the default, `experts=True`) loads back with peft_fast.load_quantized, not with transformers + bitsandbytes.
Patch the result with peft_fast.get_peft_model for QLoRA.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from ..kernels.common.nf4_format import BLOCKSIZES
from ..progress import progress
from .experts import is_experts_module
from .nf4_experts import quantize_experts
from .nf4_linear import NF4Linear, check_storable, storage_dtype

__all__ = ["quantize"]


def _default_skips(model: nn.Module) -> set[str]:
    """What transformers keeps in 16-bit under bitsandbytes (get_keys_to_not_convert): the output embedding
    (lm_head), and the module of the model's last parameter (a classifier head, `score`)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    skips = {n for n, m in model.named_modules() if head is not None and m is head}
    last = next(reversed(list(model.named_parameters())), None)
    if last is not None:
        skips.add(last[0].removesuffix(".weight"))  # as transformers: a last bias names no module, and skips none
    return skips


def _skipped(name: str, skips: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skips)


def quantize(model: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
             compute_dtype: Optional[torch.dtype] = None, skip_modules: Optional[list[str]] = None,
             experts: bool = True, progressbar: bool = False, quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Replace every `torch.nn.Linear` in ``model`` (in place) by a frozen 4-bit `NF4Linear` and return the model.

    quant_type: "nf4" or "fp4"; blocksize: bitsandbytes' block size (64 by default); double_quant: quantize the
    absmax too (bnb_4bit_use_double_quant); compute_dtype: the matmul dtype (bnb_4bit_compute_dtype; None: the
    input's); skip_modules: names (or name suffixes) to leave dense, in addition to what transformers leaves
    dense under bitsandbytes (the output embedding, the module of the last parameter); experts: also store
    transformers mixture-of-experts stacks (`mlp.experts.gate_up_proj`, ...) in 4 bits, which bitsandbytes cannot
    (they are not nn.Linear), keeping each experts module's class and forward contract; quant_storage: the dtype
    the parameters holding the packed codes (the linear layers' `weight`, the expert stacks' `<stack>_nf4`) keep
    them in (bnb_4bit_quant_storage): uint8, or a float type for FSDP2 on torch 2.11, which shards no integer
    parameters (then also FSDP's param_dtype).
    Nothing changes unless every layer can be quantized.
    """
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quantize: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize: blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes), got {blocksize}")
    return quantize_except(model, set(skip_modules or ()) | _default_skips(model), quant_type=quant_type,
                           blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                           experts=experts, progressbar=progressbar, quant_storage=quant_storage)


def quantize_except(model: nn.Module, skips: set[str], *, quant_type: str, blocksize: int, double_quant: bool,
                    compute_dtype: Optional[torch.dtype], experts: bool, progressbar: bool,
                    quant_storage: torch.dtype) -> nn.Module:
    """`quantize` with exactly these layers (names or name suffixes) left dense, no default added: what
    load_quantized needs to rebuild a checkpoint's own choice."""
    quant_storage = storage_dtype(quant_storage)
    todo = [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and n and not _skipped(n, skips)]
    stacks = [(n, m) for n, m in model.named_modules()
              if experts and n and not _skipped(n, skips) and is_experts_module(m) and
              any(isinstance(p, torch.Tensor) and p.dim() == 3 for p in m._parameters.values())]
    for name, m in todo:
        if not m.weight.dtype.is_floating_point or not torch.isfinite(m.weight).all():
            raise ValueError(f"quantize: {name}.weight must be finite floating point, got {m.weight.dtype} "
                             "with non-finite values" if m.weight.dtype.is_floating_point else
                             f"quantize: {name}.weight must be floating point, got {m.weight.dtype}")
    for name, m in stacks:
        for pname, p in m._parameters.items():
            if p is not None and p.dim() == 3 and (p.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                                                   or not torch.isfinite(p).all()):
                raise ValueError(f"quantize: {name}.{pname} must be finite float32/float16/bfloat16, got {p.dtype}")
            if p is not None and p.dim() == 3:
                check_storable((p.numel() + 1) // 2, quant_storage,
                               f"quantize: {name}.{pname}'s {tuple(p.shape)} stack")
    for name, m in todo:  # before any layer changes
        check_storable((m.weight.numel() + 1) // 2, quant_storage, f"quantize: {name}'s {tuple(m.weight.shape)} weight")
    bar = progress(len(todo) + len(stacks), progressbar, f"Quantizing to {quant_type.upper()}")
    made = {}
    try:
        for n, m in todo:
            made[n] = NF4Linear.from_linear(m, blocksize=blocksize, compress_statistics=double_quant,
                                            quant_type=quant_type, compute_dtype=compute_dtype,
                                            quant_storage=quant_storage)
            bar.update()
    finally:
        bar.close()
    for name, layer in made.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    for _, m in stacks:  # after the checks above, this cannot fail half way
        quantize_experts(m, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type,
                         compute_dtype=compute_dtype, quant_storage=quant_storage)
        bar.update()
    return model
