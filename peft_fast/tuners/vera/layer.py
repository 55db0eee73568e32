"""VeraLinear: PEFT's VeRA layer (`vera.Linear`, over nn.Linear, Conv1D and 4-bit bases) on the tuner seam.

Per adapter it trains two vectors, `vera_lambda_b.<name>` (out_features) and `vera_lambda_d.<name>` (r); the
projections `vera_A` / `vera_B` are the model's shared BufferDicts (projections.py), referenced here as PEFT does,
so the model's state dict lists them under every layer too. What forward runs is compute.py's; this file holds the
adapters' state, PEFT's merge rule (W += Λ_b·B_s·Λ_d·A_s, in the base's dtype) and the file layout.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..base_layer import TunerLayer
from .compute import VeraCompute
from .projections import BufferDict, largest_shape


class VeraLinear(VeraCompute, TunerLayer):
    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("vera_A", "vera_B", "vera_dropout", "r")
    shared_adapter_dicts = ("vera_A", "vera_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, autocast_adapter_dtype: bool = True, *,
                 r: int, vera_A: BufferDict, vera_B: BufferDict):
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.vera_dropout = nn.ModuleDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_A, self.vera_B = vera_A, vera_B
        self._folded: dict[str, tuple] = {}
        self.fan_in_fan_out = self.corrected_fan_in_fan_out(config)
        self.in_features, self.out_features = self.base_view.in_features, self.base_view.out_features
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, config, autocast_adapter_dtype, r=r, vera_A=vera_A, vera_B=vera_B)

    def update_layer(self, name: str, config, autocast_adapter_dtype: bool = True, *, r: int,
                     vera_A: BufferDict, vera_B: BufferDict) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[name] = r
        dropout = nn.Dropout(p=config.vera_dropout) if config.vera_dropout > 0.0 else nn.Identity()
        # Follow the layer's mode, so an adapter added to a model in eval mode does not drop out (as LoRA here).
        self.vera_dropout[name] = dropout.train(self.training)
        # Created in PEFT's order (Λ_b = 1, Λ_d ~ N(0, 1) from the global RNG): the same draws under one seed.
        lambda_b, lambda_d = torch.ones(self.out_features), torch.randn(r)
        if config.init_weights:
            lambda_d.fill_(config.d_initial)
            lambda_b.zero_()
        self.vera_lambda_b[name] = nn.Parameter(self.placed(lambda_b, autocast_adapter_dtype))
        self.vera_lambda_d[name] = nn.Parameter(self.placed(lambda_d, autocast_adapter_dtype))
        # PEFT moves the shared projections to each adapted layer's device and dtype in turn (then upcasts 16-bit).
        for shared in (vera_A, vera_B):
            shared[name] = self.placed(shared[name], autocast_adapter_dtype)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _clear_caches(self) -> None:
        self._folded.clear()

    # --- merging: PEFT's rule (the bookkeeping is tuners/merging.py) ----------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """Λ_b·B_s·Λ_d·A_s in the weight's stored layout, in the projections' dtype (computed in float32 on the CPU
        for 16-bit ones, as PEFT does: CPU half-precision matmuls are slow and lossy)."""
        a, b = self.slices(name)
        lambda_d, lambda_b = self.vera_lambda_d[name].detach(), self.vera_lambda_b[name].detach()
        dtype = b.dtype
        cast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast:
            a, b, lambda_d, lambda_b = a.float(), b.float(), lambda_d.float(), lambda_b.float()
        delta = (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(dtype) if cast else delta

    # In place whatever the weight: PEFT adds the delta into the (copied, dequantized or live) weight, so a 16-bit
    # weight takes the float32 delta with one rounding.
    def merge_weight(self, name: str, weight: torch.Tensor, ctx: Any, live: bool = False) -> torch.Tensor:
        weight += self.get_delta_weight(name)
        return weight

    def unmerge_weight(self, name: str, weight: torch.Tensor, live: bool = False) -> torch.Tensor:
        weight -= self.get_delta_weight(name)
        return weight

    # --- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        return {"vera_lambda_b": (target.out_features,), "vera_lambda_d": (target.kwargs["r"],)}

    @classmethod
    def expected_shared_state(cls, model: nn.Module, plan) -> dict[str, Optional[tuple[int, ...]]]:
        existing = next((m for m in model.modules() if isinstance(m, cls) and len(m.vera_A)), None)
        if existing is not None:  # a later adapter: it gets the model's projections (their shapes)
            a_shape, b_shape = (tuple(next(iter(d.values())).shape) for d in (existing.vera_A, existing.vera_B))
        else:
            out_max, in_max = largest_shape(plan.targets)
            a_shape, b_shape = (plan.config.r, in_max), (out_max, plan.config.r)
        if not plan.config.save_projection:
            return {"base_model.vera_A": None, "base_model.vera_B": None}
        return {"base_model.vera_A": a_shape, "base_model.vera_B": b_shape}

    def __repr__(self) -> str:
        return "vera.Linear" + super().__repr__()[len(type(self).__name__):]
