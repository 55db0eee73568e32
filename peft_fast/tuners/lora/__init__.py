"""LoRA (and its DoRA variant): the first tenant of the tuner seam, registered as peft_type "LORA"."""
from ..registry import TunerSpec, register
from . import peft_layers
from .config import LoraConfig, LoraRuntimeConfig
from .conv import LoraConv, LoraConv1d, LoraConv2d, LoraConv3d
from .embedding import LoraEmbedding
from .experts import LoraParam
from .layer import LoraLinear
from .model import LoraModel

register(TunerSpec("LORA", LoraConfig, LoraModel, (LoraLinear, LoraEmbedding, LoraConv1d, LoraConv2d, LoraConv3d,
                                                     LoraParam),
                   peft_layers=peft_layers, card_tag="lora", default=True))

__all__ = ["LoraConfig", "LoraRuntimeConfig", "LoraConv", "LoraConv1d", "LoraConv2d", "LoraConv3d", "LoraEmbedding",
           "LoraLinear", "LoraModel", "LoraParam"]
