"""AdaLoraLayer: PEFT's AdaLoRA layer (`adalora.SVDLinear` over nn.Linear, GPT-2's Conv1D and 4-bit bases,
`adalora.SVDConv2d`) on the tuner seam.

Per adapter it trains the triplet `lora_A.<name>` [r, in(·k)], `lora_E.<name>` [r, 1] and `lora_B.<name>` [out, r],
and keeps `ranknum.<name>` (frozen, the initial rank: the delta is scaled by lora_alpha / (ranknum + 1e-5)). Pruned
ranks are E entries set to zero (the rank allocator does it); saved files hold only the kept ranks when the config
has a `rank_pattern`, and a layer loaded from such a file has only those. What forward runs is compute.py's; this
file holds the adapters' state, PEFT's initialisation, the merge rule and the file layout.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from ...bases import BaseView, ConvView, is_4bit, linear_view
from ...bases.view import Conv1D
from ..base_layer import TunerLayer
from .compute import AdaLoraCompute


def base_kind(module: nn.Module, key: Optional[str] = None) -> str:
    """"Linear" (nn.Linear, transformers' Conv1D, 4-bit layers) or "Conv2d"; otherwise an error saying why."""
    where = f"Target module {key}" if key else f"Target module {module}"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            # PEFT sizes A for all in_channels and fails in forward on a grouped weight.
            raise ValueError(f"{where} is a Conv2d with groups={module.groups}: AdaLoRA adapts ungrouped Conv2d "
                             "layers only (PEFT 0.21.2 fails in forward on grouped ones); leave it out of "
                             "target_modules.")
        return "Conv2d"
    if isinstance(module, (nn.Linear, Conv1D)) or is_4bit(module):
        return "Linear"
    raise ValueError(f"{where} ({type(module).__name__}) is not supported. Currently, only `torch.nn.Linear`, "
                     "`Conv1D`, and `torch.nn.Conv2d` are supported (and 4-bit linear layers).")


class AdaLoraLayer(AdaLoraCompute, TunerLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")
    rescalable = True
    # The live config of each adapter (set by AdaLoraModel): its rank_pattern decides what the files hold.
    extra_adapter_dicts = ("adapter_config",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, autocast_adapter_dtype: bool = True, *,
                 r: int, lora_alpha: float, key: str, keep: Optional[list[bool]] = None):
        super().__init__(base_layer)
        self.kind = base_kind(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.adapter_config: dict[str, Any] = {}
        self.key = key  # the layer's path in the adapted model: rank_pattern's keys start with it
        self._values: dict = {}  # eval cache (compute.py)
        self._active_adapter = [adapter_name]
        view = self.base_view
        self.in_features, self.out_features = view.in_features, view.out_features
        self.fan_in_fan_out = self.corrected_fan_in_fan_out(config) if self.kind == "Linear" else False
        self.update_layer(adapter_name, config, autocast_adapter_dtype, r=r, lora_alpha=lora_alpha, key=key,
                          keep=keep)

    @classmethod
    def view_for(cls, module: nn.Module, key: Optional[str] = None) -> BaseView:
        return ConvView(module) if base_kind(module, key) == "Conv2d" else linear_view(module, key)

    @classmethod
    def in_width(cls, base: nn.Module, in_features: int) -> int:
        """A's columns: in_features, or in_channels·kh·kw for a Conv2d."""
        return in_features * math.prod(base.kernel_size) if isinstance(base, nn.Conv2d) else in_features

    def update_layer(self, name: str, config, autocast_adapter_dtype: bool = True, *, r: int, lora_alpha: float,
                     key: str, keep: Optional[list[bool]] = None) -> None:
        """PEFT's update_layer: A, E, B and ranknum drawn in its order (randn each; the same values under one
        seed), then, with init_lora_weights, E = 0 and A, B ~ N(0, 0.02). With `keep` (a file whose rank_pattern
        pruned ranks) the adapter has only the kept ranks, and ranknum stays the initial rank, as PEFT's resize
        leaves it."""
        if r < 0:  # r == 0 is allowed for AdaLoRA (PEFT #1539)
            raise ValueError(f"`r` should be a positive integer or 0, but the value passed is {r}")
        rank = r if keep is None else sum(keep)
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else nn.Identity()
        self.lora_dropout[name] = dropout.train(self.training)
        a = torch.randn(rank, self.in_width(self.base_layer, self.in_features))
        e = torch.randn(rank, 1)
        b = torch.randn(self.out_features, rank)
        ranknum = torch.randn(1).fill_(float(r if rank > 0 else 0))
        if config.init_lora_weights:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        self.r[name] = rank
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha if lora_alpha > 0 else float(rank)
        for dict_name, value in (("lora_A", a), ("lora_E", e), ("lora_B", b)):
            getattr(self, dict_name)[name] = nn.Parameter(self.placed(value, autocast_adapter_dtype))
        self.ranknum[name] = nn.Parameter(self.placed(ranknum, autocast_adapter_dtype), requires_grad=False)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def resize(self, name: str, keep: list[bool]) -> None:
        """Keep only the ranks `keep` marks (PEFT's resize_modules_by_rank_pattern); ranknum, and so the scale, is
        unchanged."""
        rank = sum(keep)
        index = torch.tensor(keep, dtype=torch.bool, device=self.lora_A[name].device)
        with torch.no_grad():
            for dict_name in ("lora_A", "lora_E"):
                old = getattr(self, dict_name)[name]
                getattr(self, dict_name)[name] = nn.Parameter(old[index].clone(), requires_grad=old.requires_grad)
            old = self.lora_B[name]
            self.lora_B[name] = nn.Parameter(old[:, index].clone(), requires_grad=old.requires_grad)
        self.r[name] = rank
        if rank == 0:
            self.ranknum[name].data.zero_()
        if self.lora_alpha[name] <= 0:
            self.scaling[name] = float(rank)
        self.invalidate()

    # --- merging: PEFT's rule (the bookkeeping is tuners/merging.py) ----------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """B·(A ⊙ E) · scaling / (ranknum + 1e-5) in the base weight's stored layout, in the adapters' dtype."""
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        if self.kind == "Conv2d":
            delta = b @ (a * e) * self.scaling[name] / (self.ranknum[name] + 1e-5)
            return delta.reshape(self.base_layer.weight.shape)
        delta = b @ (a * e)
        return (delta.T if self.fan_in_fan_out else delta) * self.scaling[name] / (self.ranknum[name] + 1e-5)

    def check_merge(self, names: list[str]) -> None:
        if names and self.base_view.quantized:
            raise NotImplementedError(
                f"Merging AdaLoRA adapters into a 4-bit layer ({type(self.base_layer).__name__}) is not supported, "
                "as in PEFT 0.21.2: keep the adapter unmerged, or load the base model in 16 or 32 bit to merge.")

    def merge_weight(self, name: str, weight: torch.Tensor, ctx: Any, live: bool = False) -> torch.Tensor:
        with torch.no_grad():
            weight += self.get_delta_weight(name)  # in place, in the weight's dtype, as PEFT adds it
        return weight

    def unmerge_weight(self, name: str, weight: torch.Tensor, live: bool = False) -> torch.Tensor:
        with torch.no_grad():
            weight -= self.get_delta_weight(name)
        return weight

    # --- files ---------------------------------------------------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's get_peft_model_state_dict for AdaLoRA: ranknum is not saved, and with a rank_pattern only the
        kept ranks are (the pattern's keys lose the adapter name in the live config on the way, as in PEFT)."""
        out = super().adapter_state(name)
        config = self.adapter_config.get(name)
        if config is None or config.rank_pattern is None:
            return out
        config.rank_pattern = {k.replace(f".{name}", ""): v for k, v in config.rank_pattern.items()}
        keep = config.rank_pattern.get(f"{self.key}.lora_E")
        if keep is None or sum(keep) == out["lora_E"].shape[0]:
            return out
        index = torch.tensor([bool(k) for k in keep], device=out["lora_E"].device)
        return {"lora_A": out["lora_A"][index], "lora_E": out["lora_E"][index], "lora_B": out["lora_B"][:, index]}

    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        module = target.module
        base = module.base_layer if isinstance(module, TunerLayer) else module
        keep = target.kwargs.get("keep")
        rank = target.kwargs["r"] if keep is None else sum(keep)
        return {"lora_A": (rank, cls.in_width(base, target.in_features)), "lora_E": (rank, 1),
                "lora_B": (target.out_features, rank)}

    def __repr__(self) -> str:
        # PEFT's names for its layers ("adalora.SVDLinear", "adalora.SVDConv2d"), which get_layer_status reports.
        name = "adalora.SVDConv2d" if self.kind == "Conv2d" else \
            ("adalora.SVDLinear4bit" if self.base_view.quantized else "adalora.SVDLinear")
        return name + super().__repr__()[len(type(self).__name__):]
