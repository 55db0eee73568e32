"""OFT (orthogonal finetuning: the input of each adapted layer rotated by block-diagonal orthogonal matrices),
registered as peft_type "OFT"."""
from ..registry import TunerSpec, register
from .config import OFTConfig
from .layer import OFTLayer
from .model import OFTModel

register(TunerSpec("OFT", OFTConfig, OFTModel, (OFTLayer,)))

__all__ = ["OFTConfig", "OFTLayer", "OFTModel"]
