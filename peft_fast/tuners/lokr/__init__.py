"""LoKr (low-rank Kronecker product adapters), registered as peft_type "LOKR"."""
from ..registry import TunerSpec, register
from .config import LoKrConfig
from .layer import LoKrLayer, factorization
from .model import LoKrModel

register(TunerSpec("LOKR", LoKrConfig, LoKrModel, (LoKrLayer,)))

__all__ = ["LoKrConfig", "LoKrLayer", "LoKrModel", "factorization"]
