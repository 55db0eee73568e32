"""LoraModel: the model with LoRA adapters (PEFT's ``LoraModel``), on the shared TunerModel."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Optional

from ..base_model import TunerModel
from ..file_keys import PREFIX
from ..targets import pattern_value
from . import dispatch
from .config import DEFAULT_TARGETS, SUPPORTED_INITS, peft_only_init, rewrites_base
from .param_targets import plan_parameters
from .layer import LoraLinear
from ..replication import keys_beyond_layers, replicate_layers
from .weighted import add_weighted_adapter


class LoraModel(TunerModel):
    prefix = "lora_"
    layer_cls = LoraLinear
    default_targets = DEFAULT_TARGETS

    @classmethod
    def target_kwargs(cls, config, key: str) -> dict:
        return {"r": pattern_value(config.rank_pattern, key, config.r),
                "lora_alpha": pattern_value(config.alpha_pattern, key, config.lora_alpha)}

    @classmethod
    def tied_kwargs(cls, config, key: str, source: dict) -> dict:
        """The embedding's rank (the factors are its own), with the scaling PEFT gives the tied layer: from this
        layer's own rank_pattern / alpha_pattern entry, as an alpha over the embedding's rank."""
        own = cls.target_kwargs(config, key)
        scaling = own["lora_alpha"] / (math.sqrt(own["r"]) if config.use_rslora else own["r"])
        r = source["r"]
        return {"r": r, "lora_alpha": scaling * (math.sqrt(r) if config.use_rslora else r)}

    @classmethod
    def layer_for(cls, module, key: str):
        return dispatch.layer_for(module, key)

    @classmethod
    def plan_parameters(cls, model, config, module_targets: list[str]) -> list:
        return plan_parameters(model, config, module_targets, cls.target_kwargs)

    @classmethod
    def with_init(cls, config, init: object):
        new = copy.copy(config)
        new.init_lora_weights = init
        return new

    @classmethod
    def rewrites_base(cls, config) -> bool:
        return rewrites_base(config.init_lora_weights)

    @classmethod
    def check_init(cls, config) -> None:
        init = config.init_lora_weights
        if peft_only_init(init):
            raise NotImplementedError(f"init_lora_weights={init!r} is a PEFT initialisation peft_fast does not "
                                      f"implement yet; use one of {SUPPORTED_INITS}. (Adapters trained with it "
                                      "load: their weights come from the file.)")

    def check_new_adapter(self, config) -> None:
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError("LoraModel supports only 1 adapter with bias. When using multiple adapters, "
                             "set bias to 'none' for all adapters.")
        # A parameter's adapters are told apart by the nesting of its wrappers, which every adapter must share.
        wanted = set(config.target_parameters or ())
        for name, other in self.peft_config.items():
            theirs = set(getattr(other, "target_parameters", None) or ())
            if wanted and theirs and wanted != theirs:
                raise ValueError("When using multiple adapters with `target_parameters`, all adapters must target the "
                                 f"same set of parameters, but got {sorted(wanted)} for the new adapter and "
                                 f"{sorted(theirs)} for adapter '{name}'.")

    @classmethod
    def prepare_model(cls, model, config):
        if getattr(config, "layer_replication", None):
            return replicate_layers(model, config.layer_replication)
        return None

    @classmethod
    def file_tensors(cls, model, config, tensors):
        # Whatever this adapter's config says: a plain adapter saved after a later one replicated the layers holds
        # its factors for the copies too.
        beyond = set(keys_beyond_layers(model, tensors, PREFIX))
        if beyond:
            warnings.warn(f"{len(beyond)} key(s) of the adapter file address replicated layers this model does not "
                          f"have (e.g. {sorted(beyond)[:2]}): a later adapter replicated the layers again when it was "
                          "saved, and these are the copies of this adapter's own factors. Skipped, as PEFT does.")
        return {k: v for k, v in tensors.items() if k not in beyond}

    def after_injection(self, config, seen) -> None:
        config.fan_in_fan_out = seen.fan_in_fan_out  # the layers correct it to their type, as PEFT does

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total", progressbar: bool = False) -> None:
        """Add ``adapter_name``, merged from ``adapters`` with ``weights`` (PEFT's add_weighted_adapter; see
        tuners/lora/weighted.py for the combination types and where it corrects PEFT)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, svd_driver, density, majority_sign_method, progressbar)
