"""AdaLoRA (adaptive LoRA: SVD-like triplets whose ranks a budget allocator prunes during training), registered as
peft_type "ADALORA"."""
from ..registry import TunerSpec, register
from .allocator import RankAllocator
from .config import AdaLoraConfig
from .layer import AdaLoraLayer
from .model import AdaLoraModel

register(TunerSpec("ADALORA", AdaLoraConfig, AdaLoraModel, (AdaLoraLayer,)))

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator"]
