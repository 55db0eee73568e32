"""A base view for torch's convolutions (Conv1d, Conv2d, Conv3d), for the tuners that adapt them (LoRA, OFT, ...).

It is not in the shared dispatcher list (`bases.VIEWS`): a tuner that adapts convolutions says so by returning this
view from its layer's `view_for`, so that the shared merge bookkeeping reads and writes a convolution's weight as
it does a linear one's; every other tuner keeps refusing convolutions.
"""
from __future__ import annotations

import torch.nn as nn

from .view import BaseView, has_hooks


class ConvView(BaseView):
    """torch.nn.Conv1d / Conv2d / Conv3d: weight [out, in / groups, *kernel]."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._plain = type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    @property
    def in_features(self) -> int:
        return self.module.in_channels

    @property
    def out_features(self) -> int:
        return self.module.out_channels

    def fused_conv(self):
        """(weight, bias) when the module's forward is exactly F.conv{1,2,3}d with its settings (a plain module, zero
        padding, no hooks), so that a convolution with another weight may replace it; else None."""
        m = self.module
        if not self._plain or has_hooks(m) or m.padding_mode != "zeros":
            return None
        return m.weight, m.bias

    def supports_norms(self) -> bool:
        return False

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
