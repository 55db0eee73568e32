"""The tuner seam: PEFT's `peft_type` -> what implements it here (config class, model class, layer classes).

A tuner registers itself when its package is imported (peft_fast imports every built-in one). Everything that
must pick a tuner from a config or a file (get_peft_model, PeftModel.from_pretrained, load_adapter, status,
hot-swapping, PeftConfig.from_pretrained) asks here; nothing outside a tuner's own package names it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class TunerSpec:
    peft_type: str  # PEFT's name, as written in adapter_config.json ("LORA", ...)
    config_cls: type  # a PeftConfig subclass
    model_cls: type  # a TunerModel subclass
    layer_classes: tuple  # its TunerLayer subclasses
    # Running Hugging Face PEFT's own layers of this type on peft_fast's kernels (peft_interop.py): an object with
    # handles(layer), adopt(layer) -> None or why not, adopted(layer), release(layer); None when not offered.
    peft_layers: Optional[Any] = None
    card_tag: Optional[str] = None  # the tag PEFT's model cards give this adapter type on the Hub ("lora")
    default: bool = False  # what a config without a peft_type means (PEFT's default, LoRA); one tuner at most


_TUNERS: dict[str, TunerSpec] = {}


def register(spec: TunerSpec) -> TunerSpec:
    known = _TUNERS.get(spec.peft_type)
    if known is not None and known != spec:
        raise ValueError(f"peft_type {spec.peft_type!r} is already registered by {known.model_cls.__name__}")
    _TUNERS[spec.peft_type] = spec
    return spec


def unregister(peft_type: str) -> None:
    _TUNERS.pop(peft_type, None)


def peft_type_name(value: Any) -> str:
    """PEFT's enum members and plain strings alike ("LORA", PeftType.LORA -> "LORA")."""
    return str(getattr(value, "value", value))


def get(peft_type: Any) -> TunerSpec:
    name = peft_type_name(peft_type)
    spec = _TUNERS.get(name)
    if spec is None:
        raise ValueError(f"peft_fast implements {', '.join(sorted(_TUNERS)) or 'no'} adapters; this config has "
                         f"peft_type={name!r}. Use Hugging Face PEFT for it.")
    return spec


def known() -> list[str]:
    return sorted(_TUNERS)


def specs() -> list[TunerSpec]:
    return list(_TUNERS.values())


def default_type() -> str:
    """The peft_type a config without one means (PEFT's files always say; hand-written dicts may not): the tuner
    registered as the default (LoRA), whatever the import order."""
    return next((name for name, spec in _TUNERS.items() if spec.default), next(iter(_TUNERS)))
