"""VeRA: shared frozen random projections, trained per-layer scaling vectors; registered as peft_type "VERA"."""
from ..registry import TunerSpec, register
from .config import VeraConfig
from .layer import VeraLinear
from .model import VeraModel

register(TunerSpec("VERA", VeraConfig, VeraModel, (VeraLinear,)))

__all__ = ["VeraConfig", "VeraLinear", "VeraModel"]
