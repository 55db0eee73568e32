"""OFTLayer: PEFT's OFT layer (`oft.Linear` over nn.Linear and 4-bit bases, `oft.Conv2d`, `oft.Embedding`) on the
tuner seam.

Per adapter it trains `oft_R.<name>.weight` [rows, b·(b-1)/2] (`oft_embedding_R.<name>.weight` on an embedding;
rotation.py): the input of the frozen base layer is rotated by diag(R) first (an embedding's output, the looked-up
rows). What forward runs is forward.py's; this file holds the adapters' state, PEFT's initialisation and block
layout, the merge rule (W ← W·diag(R)ᵀ, an embedding table's rows W ← W·diag(R); unmerged with the blocks'
inverses) and the file layout.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from ...bases import BaseView, ConvView, EmbeddingView, is_4bit, linear_view
from ..base_layer import TunerLayer
from .forward import OFTCompute
from .rotation import OFTRotation, blocks_of, fold, inverse, project, rotate, rotation


def adjusted(dim: int, value: int) -> int:
    """PEFT's adjust_oft_parameters: the divisor of `dim` nearest to `value` (the lower one on a tie)."""
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and dim % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def layout(dim: int, r: int, block: int, warn: bool = True) -> tuple[int, int]:
    """(blocks, block size) for an input of `dim` features from the config's r / oft_block_size (one is 0)."""
    if r == 0:
        if dim % block != 0 or block > dim:
            old, block = block, adjusted(dim, block)
            if warn:
                warnings.warn(f"Invalid `oft_block_size` ({old})! Adjusted `oft_block_size` to ({block}).")
        return dim // block, block
    if dim % r != 0 or r > dim:
        old, r = r, adjusted(dim, r)
        if warn:
            warnings.warn(f"Invalid `r` ({old})! Adjusted `r` to ({r}).")
    return r, dim // r


def base_kind(module: nn.Module, key: Optional[str] = None) -> str:
    """"Linear" (nn.Linear, 4-bit layers), "Conv2d" or "Embedding" for a base OFT adapts; otherwise an error."""
    where = f"Target module {key}" if key else f"Target module {module}"
    if isinstance(module, nn.Embedding):
        return "Embedding"
    if isinstance(module, nn.Conv2d):
        if module.dilation[0] > 1:
            raise ValueError("Conv2d with dilation > 1 is not supported by OFT.")
        if module.kernel_size[0] != module.kernel_size[1]:
            # PEFT sizes the rotation for a square kernel (in·k₀·k₀) and fails in forward on any other.
            raise ValueError(f"{where} has a {tuple(module.kernel_size)} kernel: OFT rotates square-kernel Conv2d "
                             "layers only (PEFT 0.21.2 fails in forward on others); leave it out of target_modules.")
        return "Conv2d"
    if isinstance(module, nn.Linear) or is_4bit(module):
        return "Linear"
    raise TypeError(f"{where} ({type(module).__name__}) is not supported. Currently, only `torch.nn.Linear`, "
                    "`torch.nn.Conv2d`, `torch.nn.Embedding` (and 4-bit linear layers) are supported; transformers' "
                    "Conv1D (GPT-2) is not supported by PEFT's OFT either. Narrow target_modules to skip it.")


class OFTLayer(OFTCompute, TunerLayer):
    adapter_layer_names = ("oft_R", "oft_embedding_R")
    other_param_names = ("r", "oft_block_size", "module_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, autocast_adapter_dtype: bool = True):
        super().__init__(base_layer)
        self.kind = base_kind(base_layer)
        self.oft_R = nn.ModuleDict()
        self.oft_embedding_R = nn.ModuleDict()  # PEFT's dict for an embedding's adapters (oft_R stays empty there)
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.module_dropout: dict[str, float] = {}
        self._values: dict = {}  # eval cache (forward.py): (adapters, what) -> (key, value, objects kept alive)
        self._active_adapter = [adapter_name]
        view = self.base_view
        self.in_features, self.out_features = view.in_features, view.out_features
        self.fan_in_fan_out = self.corrected_fan_in_fan_out(config) if self.kind == "Linear" else config.fan_in_fan_out
        self.update_layer(adapter_name, config, autocast_adapter_dtype)

    @classmethod
    def view_for(cls, module: nn.Module, key: Optional[str] = None) -> BaseView:
        kind = base_kind(module, key)
        return ConvView(module) if kind == "Conv2d" else EmbeddingView(module) if kind == "Embedding" else \
            linear_view(module, key)

    @property
    def blocks(self) -> nn.ModuleDict:
        """This layer's adapters (PEFT keeps an embedding's in their own dict)."""
        return self.oft_embedding_R if self.kind == "Embedding" else self.oft_R

    def has_adapter(self, name: str) -> bool:
        return name in self.blocks

    def available_adapters(self) -> list[str]:
        return sorted(self.blocks.keys())

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.base_layer.kernel_size) if self.kind == "Conv2d" else (1, 1)

    @classmethod
    def filter_dim(cls, base: nn.Module, in_features: int) -> int:
        """The size of the rotated vectors: the input features, or a Conv2d's in_channels·k₀·k₀ (PEFT's)."""
        return in_features * base.kernel_size[0] * base.kernel_size[0] if isinstance(base, nn.Conv2d) else in_features

    def update_layer(self, name: str, config, autocast_adapter_dtype: bool = True) -> None:
        dim = self.filter_dim(self.base_layer, self.in_features)
        r, block = layout(dim, config.r, config.oft_block_size)
        module = OFTRotation(1 if config.block_share else r, block, dim, config,
                             tuple(self.base_layer.kernel_size) if self.kind == "Conv2d" else (0, 0))
        # As PEFT: made in the default dtype on the CPU and initialised there (the same draws under one seed), then
        # moved to the base's device and floating dtype, 16-bit upcast to float32.
        with torch.no_grad():
            if config.init_weights:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=0.1)
        module.weight = nn.Parameter(self.placed(module.weight.data, autocast_adapter_dtype))
        module.to(self.base_view.device)
        self.blocks[name] = module
        self.r[name], self.oft_block_size[name] = r, block
        self.module_dropout[name] = config.module_dropout
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- merging: PEFT's rule (the bookkeeping is tuners/merging.py) ----------------------------------------------
    def delta_rotation(self, name: str) -> torch.Tensor:
        """PEFT's get_delta_weight as blocks R [rows, b, b] (never the block-diagonal matrix), in the adapter's
        dtype; 16-bit adapters on the CPU are computed in float32, as PEFT does."""
        module = self.blocks[name]
        project(module)
        w = module.weight.detach()
        cast = w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16)
        return rotation(module, w.float()).to(w.dtype) if cast else rotation(module, w)

    def check_merge(self, names: list[str]) -> None:
        if names and self.kind == "Conv2d" and self.base_layer.groups > 1:
            raise ValueError(f"Cannot merge OFT adapters into a Conv2d with groups={self.base_layer.groups}: the "
                             "rotation acts on all in_channels·k·k inputs of a filter, which a grouped weight does "
                             "not hold (PEFT 0.21.2 fails there too). Keep the adapter unmerged.")

    def _apply_blocks(self, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """W·diag(R)ᵀ in the blocks' dtype (an embedding table: W·diag(R))."""
        w = weight.reshape(weight.shape[0], -1).to(r.dtype)
        return (rotate(w, r) if self.kind == "Embedding" else fold(w, r)).reshape(weight.shape)

    def merge_weight(self, name: str, weight: torch.Tensor, ctx: Any, live: bool = False) -> torch.Tensor:
        new = self._apply_blocks(weight, blocks_of(self.blocks[name], self.delta_rotation(name)))
        if live:  # PEFT writes into the weight's own storage
            return weight.copy_(new)
        return new.to(weight.dtype)

    def unmerge_weight(self, name: str, weight: torch.Tensor, live: bool = False) -> torch.Tensor:
        inv = blocks_of(self.blocks[name], inverse(self.delta_rotation(name)))
        return self._apply_blocks(weight, inv).to(weight.dtype)

    # --- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        base = target.module.base_layer if isinstance(target.module, TunerLayer) else target.module
        r, block = layout(cls.filter_dim(base, target.in_features), config.r, config.oft_block_size, warn=False)
        key = "oft_embedding_R.weight" if isinstance(base, nn.Embedding) else "oft_R.weight"
        return {key: (1 if config.block_share else r, math.comb(block, 2))}

    def __repr__(self) -> str:
        # PEFT's names for its layers ("oft.Linear", "oft.Conv2d"), which get_layer_status reports.
        return f"oft.{self.kind}" + super().__repr__()[len(type(self).__name__):]
