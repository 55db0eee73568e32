"""LycorisLayer: what a LoHa or LoKr layer shares (PEFT's LycorisLayer), on the shared TunerLayer.

A tuner's layer class gives:
- `adapter_layer_names`: its ParameterDicts (PEFT's names, which are also the file keys);
- `adapter_shapes(base, kind, config, r)`: the shape of each factor an adapter gets on that base;
- `init_factors(name, init_weights)`: PEFT's initialisation, in PEFT's order (same values under one seed);
- `delta(name)`: ΔW · scaling, shaped like the base weight.
Forward (forward.py), the eval cache of ΔW, merges, rank dropout, file keys and PEFT's dtype rules live here.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ...bases import BaseView
from ...kernels.common.autocast import autocast_off
from ...kernels.common.backend import keeps_no_state
from ...names import BASE_NAME
from ..base_layer import TunerLayer
from .bases import base_kind, view_for
from .forward import DeltaPlan, add_delta, compute_dtype, foldable


def _param_key(p: torch.Tensor) -> tuple:
    # The storage address is part of the key so that `p.data = ...` (which keeps the version counter) is seen.
    return (id(p), p._version, p.data_ptr())


class LycorisLayer(TunerLayer):
    tuner_name = "LyCORIS"  # for messages ("LoHa", "LoKr")
    repr_prefix = "lycoris"  # PEFT's module type prefix ("loha", "lokr"), reported by get_layer_status
    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, alpha: float,
                 autocast_adapter_dtype: bool = True):
        kind = self.check_base(base_layer)
        super().__init__(base_layer)
        self.kind = kind
        for dict_name in self.adapter_layer_names:
            setattr(self, dict_name, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self._values: dict = {}  # eval cache: (adapters, folded, dtype) -> (key, ΣΔW or W + ΣΔW, objects kept alive)
        self._active_adapter = [adapter_name]
        self.in_features, self.out_features = self.base_view.in_features, self.base_view.out_features
        self.update_layer(adapter_name, config, r, alpha, autocast_adapter_dtype)

    @classmethod
    def check_base(cls, base: nn.Module, key: Optional[str] = None) -> str:
        return base_kind(base, cls.tuner_name, key)

    @classmethod
    def view_for(cls, module: nn.Module, key: Optional[str] = None) -> BaseView:
        return view_for(module, cls.tuner_name, key)  # convolutions too

    # --- adapters ------------------------------------------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        # LoKr adapters hold different factor sets (w1 or w1_a/w1_b, ...): any dict may be the one that has it.
        return any(name in getattr(self, d) for d in self.adapter_layer_names)

    def available_adapters(self) -> list[str]:
        return sorted({n for d in self.adapter_layer_names for n in getattr(self, d)})

    def factors(self, name: str) -> list[nn.Parameter]:
        return [getattr(self, d)[name] for d in self.adapter_layer_names if name in getattr(self, d)]

    def adapter_dtype(self, names: list[str]) -> torch.dtype:
        return self.factors(names[0])[0].dtype

    def update_layer(self, name: str, config, r: int, alpha: float, autocast_adapter_dtype: bool = True) -> None:
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[name] = r
        self.alpha[name] = alpha
        self.scaling[name] = alpha / r
        self.rank_dropout[name] = config.rank_dropout
        self.module_dropout[name] = config.module_dropout
        if hasattr(config, "rank_dropout_scale"):
            self.rank_dropout_scale[name] = config.rank_dropout_scale
        # As PEFT: factors made in the default dtype on the CPU, initialised there (same draws under one seed),
        # moved to the base's device and floating dtype, then 16-bit ones upcast to float32.
        for dict_name, shape in self.adapter_shapes(self.base_layer, self.kind, config, r).items():
            getattr(self, dict_name)[name] = nn.Parameter(torch.empty(shape))
        self.init_factors(name, config.init_weights)
        with torch.no_grad():
            for dict_name in self.adapter_layer_names:
                params = getattr(self, dict_name)
                if name in params:
                    params[name] = nn.Parameter(self.placed(params[name], autocast_adapter_dtype))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- the tuner's part --------------------------------------------------------------------------------------
    @classmethod
    def adapter_shapes(cls, base: nn.Module, kind: str, config, r: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def init_factors(self, name: str, init_weights: Any) -> None:
        raise NotImplementedError

    def delta(self, name: str) -> torch.Tensor:
        """ΔW · scaling of adapter `name`, shaped like the base weight, differentiable in the factors."""
        raise NotImplementedError

    def rank_dropout_mask_dtype(self, delta: torch.Tensor) -> torch.dtype:
        return delta.dtype

    def scales_rank_dropout(self, name: str) -> bool:
        return True

    # --- PEFT's delta weight, scaling hooks ---------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        """PEFT's: ΔW of the adapter; with `apply_rank_dropout`, output rows dropped with probability rank_dropout
        (one CPU `torch.rand(out_features)`, as PEFT draws it) and, where the tuner scales, the rest rescaled."""
        weight = self.delta(adapter_name)
        if apply_rank_dropout:
            drop = torch.rand(weight.size(0)) > self.rank_dropout[adapter_name]
            drop = drop.to(self.rank_dropout_mask_dtype(weight)).view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
            if self.scales_rank_dropout(adapter_name):
                drop = drop / drop.mean()  # no rows kept: 0 / 0, NaN, as in PEFT
            weight = (weight * drop).to(weight.dtype)  # PEFT multiplies in place: the weight keeps its dtype
        return weight

    def set_scale(self, adapter: str, scale: float) -> None:
        if self.has_adapter(adapter):
            self.scaling[adapter] = scale * self.alpha[adapter] / self.r[adapter]

    def scale_layer(self, scale: float) -> None:
        if scale == 1:
            return
        for name in self.active_adapters:
            if self.has_adapter(name):
                self.scaling[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for name in self.active_adapters:
            if self.has_adapter(name):
                self.scaling[name] = self.alpha[name] / self.r[name] if scale is None else self.scaling[name] / scale

    # --- forward -------------------------------------------------------------------------------------------------
    def make_plan(self, x: torch.Tensor):
        active = [a for a in self.active_adapters if self.has_adapter(a)]
        if self.merged or not active:
            return self.base_layer
        return DeltaPlan(self, active, foldable(self, x, active))

    def caches(self, names: list[str], base: Optional[torch.Tensor] = None) -> bool:
        """Whether ΣΔW of `names` (plus `base`) is served from the cache: outside training and compiled code, when no
        gradient is wanted."""
        if self.training or keeps_no_state():
            return False
        return not (torch.is_grad_enabled() and (any(p.requires_grad for n in names for p in self.factors(n)) or
                                                 (base is not None and base.requires_grad)))

    def delta_value(self, names: list[str], dtype: torch.dtype, base: Optional[torch.Tensor] = None):
        """ΣΔW of `names` in `dtype` (plus `base`, the base weight, when given). Outside training, when no gradient
        is wanted, the value is cached until a factor, a scaling or the base changes."""
        def compute():
            total = None
            for name in names:
                d = self.get_delta_weight(name)
                total = d if total is None else total + d
            return (total if base is None else base + total).to(dtype)

        if not self.caches(names, base):
            return compute()
        slot = (tuple(names), base is not None, dtype)
        key = tuple(k for n in names for p in self.factors(n) for k in _param_key(p)) + \
            tuple(self.scaling[n] for n in names) + ((self.base_view.version()) if base is not None else ())
        hit = self._values.get(slot)
        if hit is None or hit[0] != key:
            kept = [p for n in names for p in self.factors(n)] + ([base] if base is not None else [])
            with torch.no_grad(), autocast_off(kept[0].device):  # kept for later calls, with or without autocast
                value = compute()
            hit = self._values[slot] = (key, value, kept)  # kept alive: no id in the key can be reused meanwhile
        return hit[1]

    # Rows split by name in Python, which torch.compile would guard on (a recompile per new mix): run eagerly.
    @torch.compiler.disable
    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each sample through its own adapter ("__base__": none). PEFT 0.21.2 ignores `adapter_names` for LoHa and
        LoKr (every sample gets the active adapters); here each gets the one it names, as LoRA's mixed batches do."""
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name == BASE_NAME or not self.has_adapter(name):
                continue
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            xr = x[rows]
            delta = self.delta_value([name], compute_dtype(self, xr, self.adapter_dtype([name]), self.caches([name])))
            result[rows] = add_delta(self, xr, result[rows], delta)
        return result

    def _clear_caches(self) -> None:
        self._values = {}

    def __getstate__(self):
        state = super().__getstate__()
        state["_values"] = {}
        return state

    # --- merging: the base weight plus ΔW, as PEFT does it in place -----------------------------------------------
    def merge_weight(self, name: str, weight: torch.Tensor, ctx: Any, live: bool = False) -> torch.Tensor:
        with torch.no_grad():
            weight += self.get_delta_weight(name)
        return weight

    def unmerge_weight(self, name: str, weight: torch.Tensor, live: bool = False) -> torch.Tensor:
        with torch.no_grad():
            weight -= self.get_delta_weight(name)
        return weight

    # --- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        base = target.module.base_layer if isinstance(target.module, TunerLayer) else target.module
        kind = cls.check_base(base, target.key)
        return cls.adapter_shapes(base, kind, config, target.kwargs["r"])

    def __repr__(self) -> str:
        # PEFT's name for this layer ("loha.Linear", "lokr.Conv2d"), which get_layer_status reports.
        return f"{self.repr_prefix}.{self.kind}" + super().__repr__()[len(type(self).__name__):]

