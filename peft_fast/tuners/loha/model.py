"""LoHaModel: the model with LoHa adapters (PEFT's ``LoHaModel``), on the shared LyCORIS model."""
from __future__ import annotations

from ..lycoris.model import LycorisModel
from .config import LoHaConfig
from .layer import LoHaLayer


class LoHaModel(LycorisModel):
    prefix = "hada_"
    config_cls = LoHaConfig
    layer_cls = LoHaLayer
