"""Autocast switched off where a value must come out in its inputs' precision whatever the caller runs under."""
from __future__ import annotations

import contextlib

import torch


def autocast_off(device: torch.device):
    """A context running ops in their inputs' dtypes while autocast is on for `device` (a no-op otherwise, and for
    devices autocast does not know, e.g. meta)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()
