"""VeraModel: the model with VeRA adapters (PEFT's ``VeraModel``), on the shared TunerModel.

The model holds the projections (`base_model.vera_A` / `base_model.vera_B`, one entry per adapter, persistent as the
first adapter's `save_projection` says) and hands the same two dicts to every layer. The first adapter's pair is
drawn from its `projection_prng_key`, sized for the largest targeted layer; later adapters get a copy of it (PEFT
shares the very tensor; a copy keeps a later file's projections from overwriting an earlier adapter's).
"""
from __future__ import annotations

import warnings
from typing import Optional

from ...config import as_config
from ...names import check_adapter_name
from .. import injection
from ..base_model import TunerModel
from .config import DEFAULT_TARGETS, VeraConfig
from .layer import VeraLinear
from .projections import BufferDict, draw, largest_shape

_SIZE = ("{} has a size of {} but {} or greater is required; this probably happened because an additional VeRA "
         "adapter was added after the first one with incompatible shapes.")
_RANK = ("{} has a size of {} but {} or greater is required; this probably happened because an additional VeRA "
         "adapter with a lower rank was added after the first one; loading the adapters in reverse order may "
         "solve this.")


class VeraModel(TunerModel):
    prefix = "vera_lambda_"
    layer_cls = VeraLinear
    default_targets = DEFAULT_TARGETS

    @classmethod
    def target_kwargs(cls, config, key: str) -> dict:
        return {"r": config.r}

    def check_new_adapter(self, config) -> None:
        for existing in self.peft_config.values():
            if existing.projection_prng_key != config.projection_prng_key:
                raise ValueError(
                    f"Vera PRNG initialisation key must be the same for all adapters. Got config.projection_prng_key="
                    f"{config.projection_prng_key} but previous config had {existing.projection_prng_key}.")
        saved = sorted({c.save_projection for c in [*self.peft_config.values(), config]})
        if len(saved) > 1:
            raise ValueError("VeRA projection weights must be saved for all adapters or none, but got multiple "
                             f"different values: {saved}")
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError("VeraModel supports only 1 adapter with bias. When using multiple adapters, set bias to "
                             "'none' for all adapters.")

    def after_injection(self, config, seen) -> None:
        config.fan_in_fan_out = seen.fan_in_fan_out  # the layers correct it to their type, as PEFT does

    def add_adapter(self, adapter_name: str, config, autocast_adapter_dtype: bool = True,
                    init: Optional[object] = None, plan: Optional[injection.Plan] = None,
                    tensors: Optional[dict] = None, source: str = "the adapter") -> None:
        """Projections for the new adapter first (checked against every target), then the shared add."""
        config = as_config(config)
        added = False
        if isinstance(config, VeraConfig) and adapter_name not in self.peft_config:  # else the shared add refuses
            check_adapter_name(adapter_name)
            self.check_new_adapter(config)
            plan = plan or injection.plan_adapter(self.model, config, type(self))
            pair = self._projections(config, plan)
            if "vera_A" not in self._modules:  # the first adapter decides whether they are saved, as in PEFT
                self.vera_A = BufferDict(persistent=config.save_projection)
                self.vera_B = BufferDict(persistent=config.save_projection)
            for t in plan.targets:
                t.kwargs.update(vera_A=self.vera_A, vera_B=self.vera_B)
            self.vera_A[adapter_name], self.vera_B[adapter_name] = pair
            added = True
        try:
            super().add_adapter(adapter_name, config, autocast_adapter_dtype, init, plan, tensors, source)
        except BaseException:
            if added:
                for shared in (self.vera_A, self.vera_B):
                    if adapter_name in shared:
                        del shared[adapter_name]
            raise
        if tensors is not None and not config.save_projection:
            present = any(k.endswith("vera_A") for k in tensors)
            warnings.warn(
                "Specified to not load vera_A and vera_B from state dictionary however they are present in state "
                "dictionary! Consider using them to ensure checkpoint loading is correct on all platforms using "
                "`peft_config.save_projection = True`" if present else
                "Specified to not load vera_A and vera_B from state dictionary. This means we will be relying on PRNG "
                "initialisation to restore these projections using `config.projection_prng_key`, which may not be "
                "accurate on all system configurations.")

    def _projections(self, config, plan: injection.Plan):
        """The new adapter's (vera_A, vera_B): drawn for the first adapter, a copy of the model's for later ones,
        which must fit every layer they target (PEFT checks only the first, and the others fail in forward)."""
        existing = self._modules.get("vera_A")
        if existing is None or not len(existing):
            out_max, in_max = largest_shape(plan.targets)
            return draw(config.r, in_max, out_max, config.projection_prng_key)
        a, b = next(iter(self.vera_A.values())), next(iter(self.vera_B.values()))
        if a.shape[0] < config.r:
            raise ValueError(_RANK.format("vera_A", a.shape[0], config.r))
        if a.shape[0] != config.r:
            # PEFT accepts it and fails in forward, where Λ_d (r) meets A's rows (the first adapter's r).
            raise ValueError(f"A VeRA adapter with r={config.r} cannot be added beside adapters with r={a.shape[0]}: "
                             "all VeRA adapters of a model share one pair of projections, of the first adapter's "
                             f"rank. Use r={a.shape[0]}, or put this adapter in its own model.")
        for t in plan.targets:
            if a.shape[1] < t.in_features:
                raise ValueError(_SIZE.format("vera_A", a.shape[1], t.in_features))
            if b.shape[0] < t.out_features:
                raise ValueError(_SIZE.format("vera_B", b.shape[0], t.out_features))
        return a.detach().clone(), b.detach().clone()
