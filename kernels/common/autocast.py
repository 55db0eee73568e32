"""Autocast switched off where a value must come out in its inputs' precision whatever the caller runs under."""
from __future__ import annotations

import contextlib

import torch


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for `device` (False for devices autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def autocast_off(device: torch.device):
    """A context running ops in their inputs' dtypes while autocast is on for `device` (a no-op otherwise)."""
    return torch.autocast(device.type, enabled=False) if autocast_on(device) else contextlib.nullcontext()
