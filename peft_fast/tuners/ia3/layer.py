"""IA3Linear: PEFT's (IA)³ layer (`ia3.Linear`, and `ia3.Linear4bit` over 4-bit bases) on the tuner seam; IA3Conv:
its `ia3.Conv2d` / `ia3.Conv3d`, channels scaled instead of features.

One vector per adapter, `ia3_l.<name>`: (1, in_features) on feedforward layers, which scale the input, and
(out_features, 1) on the others, which scale the output. What forward runs is compute.py's; this file holds the
adapters' state, PEFT's merge rule (the weight's columns or rows, and the bias of output-scaled layers, multiplied
by the vector; unmerging divides by it plus 1e-8, as PEFT) and the file layout.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from ...bases import BaseView, ConvView
from ..base_layer import TunerLayer
from .compute import IA3Compute


class IA3Linear(IA3Compute, TunerLayer):
    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, autocast_adapter_dtype: bool = True,
                 is_feedforward: bool = False):
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = self.orientation(config)
        self.in_features, self.out_features = self.base_view.in_features, self.base_view.out_features
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, config, autocast_adapter_dtype)

    def orientation(self, config) -> bool:
        return self.corrected_fan_in_fan_out(config)

    def vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def update_layer(self, name: str, config, autocast_adapter_dtype: bool = True,
                     is_feedforward: Optional[bool] = None) -> None:
        # A layer keeps the role it was made with: a later adapter's feedforward_modules does not change it (PEFT).
        weight = torch.randn(self.vector_shape())  # drawn even when then set to ones, as PEFT does: the same RNG stream
        if config.init_ia3_weights:
            weight.fill_(1.0)
        self.ia3_l[name] = nn.Parameter(self.placed(weight, autocast_adapter_dtype))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- merging: PEFT's rule (the bookkeeping is tuners/merging.py) ----------------------------------------------
    def _oriented(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast over the weight in its stored layout ([in, out] for Conv1D)."""
        vector = self.ia3_l[name].detach()
        return vector.T if self.fan_in_fan_out else vector

    def _bias_scale(self, name: str, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The vector shaped as the bias, for output-scaled layers (a feedforward layer's bias is untouched)."""
        if self.is_feedforward or bias is None:
            return None
        return self.ia3_l[name].detach().reshape(bias.shape)

    # Every rule works in place: merges hand it a copy, a fresh dequantized weight, or (live) the base tensor that
    # PEFT replaces by the same values. In-place products of a 16-bit weight with a float32 vector are computed in
    # float32 and rounded once, as PEFT's `(w * l).to(w.dtype)`.
    def merge_weight(self, name: str, weight: torch.Tensor, ctx: Any, live: bool = False) -> torch.Tensor:
        return weight.mul_(self._oriented(name))

    def merge_bias(self, name: str, bias: Optional[torch.Tensor], live: bool = False) -> Optional[torch.Tensor]:
        scale = self._bias_scale(name, bias)
        return bias.mul_(scale) if scale is not None else bias

    def unmerge_weight(self, name: str, weight: torch.Tensor, live: bool = False) -> torch.Tensor:
        return weight.div_(self._oriented(name) + 1e-8)  # PEFT's tolerance against division by zero

    def unmerge_bias(self, name: str, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        scale = self._bias_scale(name, bias)
        return bias.div_(scale + 1e-8) if scale is not None else bias

    def unmerge(self) -> None:
        if self.merged:
            warnings.warn("Unmerge result can be inaccurate for (IA)^3.")
        super().unmerge()

    # --- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        module = target.module
        feedforward = module.is_feedforward if isinstance(module, cls) else target.kwargs["is_feedforward"]
        return {"ia3_l": (1, target.in_features) if feedforward else (target.out_features, 1)}

    def __repr__(self) -> str:
        # PEFT's names for its layers (what get_layer_status reports): `Linear` over dense bases, `ia3.Linear4bit`.
        name = "ia3.Linear4bit" if self.base_view.quantized else "Linear"
        return name + super().__repr__()[len(type(self).__name__):]


class IA3Conv(IA3Linear):
    """PEFT's (IA)³ over nn.Conv2d / nn.Conv3d: the vector is (1, channels, 1, ...) and scales the input channels
    (feedforward layers) or the output channels; merging scales the weight's matching axis (with the groups'
    layout for input channels, as PEFT)."""

    def orientation(self, config) -> bool:
        return False  # PEFT's conv layers keep the config's value and never read it

    @classmethod
    def view_for(cls, module: nn.Module, key: Optional[str] = None) -> BaseView:
        return ConvView(module)

    @staticmethod
    def adapts(module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv2d, nn.Conv3d))

    @staticmethod
    def conv_shape(features: int, weight_dim: int) -> tuple[int, ...]:
        return (1, features) + (1,) * (weight_dim - 2)

    def vector_shape(self) -> tuple[int, ...]:
        return self.conv_shape(self.in_features if self.is_feedforward else self.out_features,
                               self.base_layer.weight.dim())

    def _oriented(self, name: str) -> torch.Tensor:
        vector = self.ia3_l[name].detach()
        if not self.is_feedforward:
            return vector.transpose(0, 1)  # (out, 1, ...): the weight's rows
        m = self.base_layer
        if m.groups == 1:
            return vector
        per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
        vector = vector.reshape(m.groups, 1, per_in, *vector.shape[2:])
        return vector.expand(m.groups, per_out, per_in, *vector.shape[3:]).reshape(m.out_channels, per_in,
                                                                                   *vector.shape[3:])

    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        module = target.module
        feedforward = module.is_feedforward if isinstance(module, cls) else target.kwargs["is_feedforward"]
        base = module.base_layer if isinstance(module, TunerLayer) else module
        return {"ia3_l": cls.conv_shape(target.in_features if feedforward else target.out_features,
                                        base.weight.dim())}

    def __repr__(self) -> str:
        name = "Conv3d" if self.base_layer.weight.dim() == 5 else "Conv2d"
        return name + TunerLayer.__repr__(self)[len(type(self).__name__):]
