"""VeRA's shared random projections: `vera_A` [r, in_max] and `vera_B` [out_max, r], one pair per adapter, held by the
model and referenced by every VeRA layer, which slices the [:, :in] / [:out, :] part it needs.

They are drawn from `projection_prng_key` alone (a CPU generator, kaiming-uniform, A then B), exactly as PEFT draws
them, so a file saved without them (`save_projection=False`) gets them back on a model with the same targets.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn


class BufferDict(nn.Module):
    """Tensors keyed by adapter name, registered as buffers (persistent or not: PEFT's `BufferDict`)."""

    def __init__(self, persistent: bool = True):
        super().__init__()
        self.persistent = persistent

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def values(self):
        return self._buffers.values()

    def items(self):
        return self._buffers.items()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self._buffers.items())


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # PEFT's _kaiming_init: fan_in of a 2-D tensor is its second size, gain sqrt(2); the same float operations.
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def draw(r: int, in_max: int, out_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vera_A [r, in_max], vera_B [out_max, r]) for `projection_prng_key` `key`, float32 on the CPU."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return _kaiming_uniform((r, in_max), generator), _kaiming_uniform((out_max, r), generator)


def largest_shape(targets) -> tuple[int, int]:
    """(out_max, in_max) over the planned targets (injection.Target): what one projection pair must cover."""
    return max(t.out_features for t in targets), max(t.in_features for t in targets)
