"""LoKrModel: the model with LoKr adapters (PEFT's ``LoKrModel``), on the shared LyCORIS model."""
from __future__ import annotations

from ..lycoris.model import LycorisModel
from .config import LoKrConfig
from .layer import LoKrLayer


class LoKrModel(LycorisModel):
    prefix = "lokr_"
    config_cls = LoKrConfig
    layer_cls = LoKrLayer
