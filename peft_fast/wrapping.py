"""What wrapping a model in a PeftModel sets up around it: the forward signature tools inspect, and inputs that
require grad under reentrant gradient checkpointing."""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch.nn as nn


class _SignedForward:
    """``forward`` with the wrapped model's signature, so that tools which inspect it (transformers.Trainer's
    remove_unused_columns) keep the dataset columns the base model accepts. Survives deepcopy and pickling."""

    def __init__(self, owner: nn.Module, signature: inspect.Signature):
        self.owner = owner
        self.__signature__ = signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.owner).forward(self.owner, *args, **kwargs)  # the class's, under the instance's

    # What tools read off a function: torch.export (non-strict) reads forward.__code__, inspect.getsource follows
    # __wrapped__ (inspect.signature stops at __signature__ first)
    @property
    def __code__(self):
        return type(self.owner).forward.__code__

    @property
    def __wrapped__(self):
        return type(self.owner).forward


def prepare_for_gradient_checkpointing(model: nn.Module) -> None:
    """As PEFT: with a frozen base, reentrant checkpointing needs inputs that require grad, or no gradient reaches
    the adapters inside checkpointed blocks. Quantized models get this from prepare_model_for_kbit_training."""
    with warnings.catch_warnings():  # transformers 5 deprecates the property we probe, as PEFT does
        warnings.simplefilter("ignore", FutureWarning)
        checkpointing = getattr(model, "is_gradient_checkpointing", True)
    quantized = any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized"))
    if not checkpointing or quantized:
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))


def expose_forward_signature(peft_model: nn.Module) -> None:
    try:
        signature = inspect.signature(peft_model.get_base_model().forward)
    except (TypeError, ValueError):
        return
    peft_model.__dict__["forward"] = _SignedForward(peft_model, signature)
