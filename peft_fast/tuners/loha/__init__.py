"""LoHa (low-rank Hadamard product adapters), registered as peft_type "LOHA"."""
from ..registry import TunerSpec, register
from .config import LoHaConfig
from .layer import LoHaLayer
from .model import LoHaModel

register(TunerSpec("LOHA", LoHaConfig, LoHaModel, (LoHaLayer,)))

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaModel"]
