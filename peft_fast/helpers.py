"""PEFT's `peft.helpers` for peft_fast models (PEFT's own check the layers' classes, which peft_fast's are not):
signature updates for tools that inspect forward/generate, `check_if_peft_model`, and `rescale_adapter_scale`."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from copy import deepcopy
from functools import update_wrapper
from types import MethodType
from typing import Iterator, Union

import torch.nn as nn

from .config import PeftConfig
from .tuners.base_layer import TunerLayer


def _only_varargs(method) -> bool:
    params = inspect.signature(method).parameters
    return set(params) == {"args", "kwargs"} or set(params) == {"kwargs"}


def _sign_like_base(model: nn.Module, method: str) -> None:
    bound = getattr(model, method)
    func = deepcopy(bound.__func__)
    update_wrapper(func, getattr(type(model.get_base_model()), method),
                   assigned=("__doc__", "__name__", "__annotations__"))
    setattr(model, method, MethodType(func, model))


def update_forward_signature(model: nn.Module) -> None:
    """Give `model.forward` the base model's docstring and annotations when it only takes *args/**kwargs (a
    peft_fast PeftModel's forward already carries the base model's signature: then nothing changes)."""
    if _only_varargs(model.forward) and hasattr(model.forward, "__func__"):
        _sign_like_base(model, "forward")


def update_generate_signature(model: nn.Module) -> None:
    """The same for `model.generate`."""
    if hasattr(model, "generate") and _only_varargs(model.generate) and hasattr(model.generate, "__func__"):
        _sign_like_base(model, "generate")


def update_signature(model: nn.Module, method: str = "all") -> None:
    if method not in ("forward", "generate", "all"):
        raise ValueError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")
    if method in ("forward", "all"):
        update_forward_signature(model)
    if method in ("generate", "all"):
        update_generate_signature(model)


def check_if_peft_model(model_name_or_path: str) -> bool:
    """True when `model_name_or_path` (a folder, or a Hub id in the local cache or reachable) holds an adapter
    config."""
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # any failure to find or read a config means "not an adapter", as in PEFT
        return False
    return True


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """Multiply every LoRA (and AdaLoRA) adapter's scaling by `multiplier` inside the block, as PEFT's helper does
    (with a multiplier in [0, 1], WiSE-FT between the base and the fine-tuned model); restored on exit, also after
    an error. The layers' derived state (DoRA's cached norms, mixed-batch slots) follows both changes."""
    if not isinstance(multiplier, (float, int)) or isinstance(multiplier, bool):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    layers = [m for m in model.modules() if getattr(m, "rescalable", False) is True or isinstance(m, _peft_lora())]
    if not layers:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    original = {m: m.scaling for m in layers}
    try:
        for m in layers:
            m.scaling = {k: v * multiplier for k, v in m.scaling.items()}
            _invalidate(m)
        yield
    finally:
        for m, scaling in original.items():
            m.scaling = scaling
            _invalidate(m)


def _peft_lora() -> tuple:
    """PEFT's LoraLayer, when PEFT is installed: a model `peft_fast.patch` runs keeps PEFT's layers it does not
    accelerate (embeddings, convolutions, ...), which PEFT's helper rescales too."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return ()
    return (LoraLayer,)


def _invalidate(layer: nn.Module) -> None:
    if hasattr(layer, "_plans"):  # peft_fast's layers, and PEFT's that peft_fast.patch runs
        TunerLayer.invalidate(layer)


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True):
    """PEFT's switch for models whose hooks cast weights per layer (diffusers' layerwise casting). peft_fast's layers
    read their adapter weights in the kernels, not through the submodules such hooks wrap, so the switch would
    not do what it does in PEFT: refused rather than ignored."""
    if active:
        raise NotImplementedError("disable_input_dtype_casting: peft_fast's layers compute the adapters in fused ops "
                                  "that bypass per-module casting hooks; use PEFT for layerwise-cast models.")
    yield
