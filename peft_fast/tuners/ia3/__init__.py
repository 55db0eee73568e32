"""(IA)³: learned vectors scaling a layer's input (feedforward layers) or output, registered as peft_type "IA3"."""
from ..registry import TunerSpec, register
from .config import IA3Config
from .layer import IA3Linear
from .model import IA3Model

register(TunerSpec("IA3", IA3Config, IA3Model, (IA3Linear,)))

__all__ = ["IA3Config", "IA3Linear", "IA3Model"]
