"""Preparing a k-bit (bitsandbytes 4-bit / 8-bit, GPTQ, ...) model for adapter training: PEFT's
`prepare_model_for_kbit_training` (peft/utils/other.py, PEFT 0.21.2), with the same effects in the same order.

1. Every parameter is frozen.
2. Unless the model is GPTQ, AQLM, EETQ, HQQ or torchao quantized, every float16 / bfloat16 parameter that is not a
   bitsandbytes `Params4bit` is upcast to float32 in place (`param.data` is replaced). As in PEFT this also happens
   for a model that is not quantized at all. bitsandbytes 8-bit weights (`Int8Params`) are int8, so the dtype test
   already leaves them alone. Then, if `auto_clear_cache`, the CUDA / XPU caching allocators are emptied.
3. Only for a quantized model (`is_loaded_in_8bit` / `is_loaded_in_4bit`, or one of the quantization methods above)
   and `use_gradient_checkpointing`: unless `gradient_checkpointing_kwargs` sets `use_reentrant` to a false value,
   the outputs of the input embeddings are made to require grad (`model.enable_input_require_grads()`, or a forward
   hook on `model.get_input_embeddings()` when the model lacks that method), so that reentrant checkpointing sees an
   input that requires grad. Then `model.activation_checkpointing_enable` (transformers 5's name) or
   `model.gradient_checkpointing_enable` is called, with
   `gradient_checkpointing_kwargs=...` only if its signature has that parameter (otherwise non-empty kwargs are
   dropped with a FutureWarning).

bitsandbytes is never imported here: a 4-bit weight is recognised by its class name, as PEFT does.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
import torch.nn as nn

from .nf4_experts import code_parameters

# quantization methods whose models PEFT does not upcast (their weights are not plain float tensors).
_NO_UPCAST_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def _quantization(model: nn.Module) -> tuple[bool, bool]:
    """(quantized at all, quantized by a method whose parameters must not be upcast)."""
    method = getattr(model, "quantization_method", None)
    no_upcast = method in _NO_UPCAST_METHODS or bool(getattr(model, "hqq_quantized", False))
    kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    kbit = kbit or bool(code_parameters(model))  # peft_fast.quantize
    return kbit or no_upcast, no_upcast


def _upcast_half_params(model: nn.Module) -> None:
    # 4-bit codes stored in a half type (quant_storage) are bytes, not values: bitsandbytes' Params4bit and
    # peft_fast's code parameters (NF4Linear weights, 4-bit expert stacks) are left alone.
    codes = code_parameters(model)
    for param in model.parameters():
        if (param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit"
                and id(param) not in codes):
            param.data = param.data.to(torch.float32)


def _empty_accelerator_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        xpu.empty_cache()


def _make_inputs_require_grad(module, inputs, output):
    output.requires_grad_(True)


def _enable_input_require_grads(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    else:
        model.get_input_embeddings().register_forward_hook(_make_inputs_require_grad)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict] = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Freeze `model`, upcast its half-precision non-4-bit parameters to float32 and, for a quantized model, enable
    gradient checkpointing with input-embedding outputs that require grad. Modifies and returns `model`.

    Same signature and effects as PEFT's `prepare_model_for_kbit_training`; see the module docstring for the exact
    rules. Meant for `transformers` models (it relies on their `gradient_checkpointing_enable` and
    `enable_input_require_grads` / `get_input_embeddings`).
    """
    quantized, no_upcast = _quantization(model)
    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = {}

    for param in model.parameters():
        param.requires_grad = False

    if not no_upcast:
        _upcast_half_params(model)
        if auto_clear_cache:
            _empty_accelerator_cache()

    if quantized and use_gradient_checkpointing:
        # Non-reentrant checkpointing does not need an input that requires grad; reentrant (the default) does.
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            _enable_input_require_grads(model)

        if hasattr(model, "activation_checkpointing_enable"):  # transformers' name since 5.x (the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
            return model
        signature = inspect.signature(model.gradient_checkpointing_enable)
        takes_kwargs = "gradient_checkpointing_kwargs" in signature.parameters
        if not takes_kwargs and len(gradient_checkpointing_kwargs) > 0:
            warnings.warn(
                "gradient_checkpointing_kwargs is not supported in this version of transformers. The passed kwargs "
                "will be ignored. if you want to use that feature, please upgrade to the latest version of "
                "transformers.",
                FutureWarning,
            )
        enable_kwargs = {"gradient_checkpointing_kwargs": gradient_checkpointing_kwargs} if takes_kwargs else {}
        model.gradient_checkpointing_enable(**enable_kwargs)
    return model
