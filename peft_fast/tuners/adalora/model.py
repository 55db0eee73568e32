"""AdaLoraModel: the model with AdaLoRA adapters (PEFT's ``AdaLoraModel``), on the shared TunerModel.

One adapter at a time trains (the others are added with inference_mode=True, as PEFT requires); it gets the rank
allocator (allocator.py), which `update_and_allocate(global_step)` drives after each backward pass, and the
orthogonality penalty on its A and B, which PEFT adds to the loss wherever the model computes one:
- in `AdaLoraModel.forward` (`peft_model.base_model(...)`, or this model used on its own), as PEFT does;
- in calls of the adapted model that peft_fast's PeftModel makes for a config with a task_type (PEFT's task models,
  PeftModelForCausalLM and the others, call the AdaLoraModel; the plain PeftModel of a config without task_type
  calls the adapted model and adds no penalty, in PEFT as here). peft_fast's PeftModel calls the adapted model in
  both cases, so the penalty comes from a forward hook on it, which `unload` / `merge_and_unload` remove.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ...config import as_config
from .. import injection
from ..base_model import TunerModel
from .allocator import RankAllocator
from .config import DEFAULT_TARGETS, AdaLoraConfig
from .layer import AdaLoraLayer


class AdaLoraModel(TunerModel):
    prefix = "lora_"
    layer_cls = AdaLoraLayer
    default_targets = DEFAULT_TARGETS
    trainable_adapter_name: Optional[str] = None
    rankallocator: Optional[RankAllocator] = None

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default", *args: Any, **kwargs: Any):
        super().__init__(model, config, adapter_name, *args, **kwargs)
        # PEFT picks its task model (whose forward calls this model's, adding the penalty) by the first config.
        self._penalty_in_model_calls = as_config(config).task_type is not None
        self._penalty_hook = model.register_forward_hook(self._penalty_hook_fn)

    @classmethod
    def target_kwargs(cls, config, key: str) -> dict:
        return {"r": config.init_r, "lora_alpha": config.lora_alpha, "key": key, "keep": config.mask_for(key)}

    def check_new_adapter(self, config) -> None:
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError("AdaLoraModel supports only 1 adapter with bias. When using multiple adapters, set bias "
                             "to 'none' for all adapters.")
        if not config.inference_mode and any(not c.inference_mode for c in self.peft_config.values()):
            raise ValueError("AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set "
                             "inference_mode to True for all adapters except the one you want to train.")

    def after_injection(self, config, seen) -> None:
        config.fan_in_fan_out = seen.fan_in_fan_out  # the layers correct it to their type, as PEFT does

    def add_adapter(self, adapter_name: str, config, autocast_adapter_dtype: bool = True,
                    init: Optional[object] = None, plan: Optional[injection.Plan] = None,
                    tensors: Optional[dict] = None, source: str = "the adapter") -> None:
        """As PEFT, an adapter created from a config with a rank_pattern has all `init_r` ranks (the pattern masks
        nothing until training re-applies it), while one loaded from a file with a rank_pattern has only the ranks
        the pattern kept, as the file does."""
        config = as_config(config)
        if isinstance(config, AdaLoraConfig) and adapter_name not in self.peft_config:
            plan = plan or injection.plan_adapter(self.model, config, type(self))
            if tensors is None:
                for t in plan.targets:
                    t.kwargs["keep"] = None
        super().add_adapter(adapter_name, config, autocast_adapter_dtype, init, plan, tensors, source)
        for _, layer in self.adapter_layers():
            if layer.has_adapter(adapter_name):
                layer.adapter_config[adapter_name] = config
        if not config.inference_mode and self.trainable_adapter_name is None:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self.model, config, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name, self.rankallocator = None, None

    # --- the orthogonality penalty ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any):
        outputs = self.model.forward(*args, **kwargs)
        self.add_orthogonal_penalty(outputs)
        return outputs

    def _penalty_hook_fn(self, module: nn.Module, args: Any, outputs: Any) -> None:
        if self._penalty_in_model_calls:
            self.add_orthogonal_penalty(outputs)

    def add_orthogonal_penalty(self, outputs: Any) -> None:
        """PEFT's: outputs.loss += orth_reg_weight · mean over the trainable adapter's A and B of ‖AAᵀ - I‖_F and
        ‖BᵀB - I‖_F (parameters found by name, in the model's order). Without a trainable adapter (a model loaded
        for inference) there is nothing to regularize and the loss is left as it is; PEFT fails there with an
        AttributeError."""
        loss = getattr(outputs, "loss", None)
        name = self.trainable_adapter_name
        if not isinstance(loss, torch.Tensor) or name is None:
            return
        weight = self.peft_config[name].orth_reg_weight
        penalty, count = 0, 0
        for n, p in self.model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and name in n:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                count += 1
                penalty += torch.norm(cov - eye, p="fro")
        outputs.loss += weight * (penalty / count if count > 0 else 0)

    # --- rank allocation -------------------------------------------------------------------------------------
    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's: update the importance scores and mask the triplets to the step's budget. Call it in every
        training step after `loss.backward()` and before `zero_grad()`; the final pattern is written into the
        trainable adapter's config (`rank_pattern`) at step `total_step - tfinal`, and re-applied after it."""
        if self.rankallocator is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (inference_mode=False); this "
                             "model has none. Load the adapter with is_trainable=True to keep training it.")
        config = self.peft_config[self.trainable_adapter_name]
        final = config.total_step - config.tfinal
        if global_step < final:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step)
            if rank_pattern:
                config.rank_pattern = rank_pattern
        elif global_step == final:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step, force_mask=True)
            config.rank_pattern = rank_pattern
            self.rankallocator.reset_ipt()
        else:
            self.rankallocator.mask_using_rank_pattern(self.model, config.rank_pattern)

    def resize_modules_by_rank_pattern(self, rank_pattern: dict, adapter_name: str) -> None:
        """Keep only the ranks the pattern marks in each layer (PEFT's; keys with or without the adapter name)."""
        for name, keep in rank_pattern.items():
            key = ".".join(name.split(".")[0:-2]) if adapter_name in name else ".".join(name.split(".")[0:-1])
            self.model.get_submodule(key).resize(adapter_name, AdaLoraConfig.as_mask(keep))

    def resize_state_dict_by_rank_pattern(self, rank_pattern: dict, state_dict: dict, adapter_name: str) -> dict:
        """PEFT's: the file tensors of the adapter reduced to the ranks the pattern keeps."""
        for name, keep in rank_pattern.items():
            keep = AdaLoraConfig.as_mask(keep)
            prefix = ".".join(name.split(".")[0:-2]) if adapter_name in name else ".".join(name.split(".")[0:-1])
            for part in ("lora_E", "lora_A", "lora_B"):
                key = f"base_model.model.{prefix}.{part}.{adapter_name}"
                t = state_dict[key]
                index = torch.tensor(keep, device=t.device)
                if part != "lora_B":
                    state_dict[key] = t[index] if sum(keep) != t.shape[0] else t
                else:
                    state_dict[key] = t[:, index] if sum(keep) != t.shape[1] else t
        return state_dict

    def add_weighted_adapter(self, *args: Any, **kwargs: Any):
        """Not supported for AdaLoRA (as in PEFT); use LoRA instead."""
        raise TypeError(f"{self.__class__.__name__} does not support add_weighted_adapter method.")

    # --- unloading: the model handed back carries no penalty hook -----------------------------------------------
    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super().merge_and_unload(*args, **kwargs)
        self._penalty_hook.remove()
        return model

    def unload(self) -> nn.Module:
        model = super().unload()
        self._penalty_hook.remove()
        return model
