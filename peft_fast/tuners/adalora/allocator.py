"""AdaLoRA's rank allocation (PEFT's RankAllocator), step by step as PEFT does it, so that a training loop prunes
the same triplets and writes the same rank pattern.

- Importance of every adapter weight: |p ⊙ ∂L/∂p|, smoothed by an exponential moving average (beta1), and its
  uncertainty |importance - average| smoothed with beta2; a weight's score is average · uncertainty.
- A triplet's score (rank i of a layer): E_i's score + the mean score of A's row i + the mean score of B's column i.
- The budget (total rank kept over the layers): all `init_r` ranks up to step `tinit`, then a cubic decrease to
  `target_r` per layer at step `total_step - tfinal`; every `deltaT` steps in between, the triplets scoring at or
  below the k-th smallest score (k = ranks to drop) get E_i = 0. From then on the final pattern is re-applied.

Parameters are found by name in the wrapped model, as PEFT finds them ("lora_A.<adapter>" and so on, substring
matches included), so that the pattern's keys are PEFT's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class RankAllocator:
    def __init__(self, model: nn.Module, config, adapter_name: str):
        self.peft_config = config
        self.adapter_name = adapter_name
        self.beta1, self.beta2 = config.beta1, config.beta2
        for key in ("beta1", "beta2"):
            if not 0 < getattr(config, key) < 1:
                raise ValueError(f"AdaLoraConfig.{key} must be strictly between 0 and 1 (an EMA coefficient), got "
                                 f"{getattr(config, key)!r}.")
        self.reset_ipt()
        self._set_budget_scheduler(model)

    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _set_budget_scheduler(self, model: nn.Module) -> None:
        self.init_bgt = 0
        names = set()
        for n, p in model.named_parameters():
            if f"lora_A.{self.adapter_name}" in n:
                self.init_bgt += p.size(0)
                names.add(n.replace("lora_A", "%s"))
        self.name_set = sorted(names)
        self.target_bgt = self.peft_config.target_r * len(self.name_set)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(ranks kept over all layers, whether to mask at this step)."""
        config = self.peft_config
        tinit, tfinal, total_step = config.tinit, config.tfinal, config.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total_step - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % config.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if "lora_" in n and self.adapter_name in n:
                if p.grad is None:
                    raise ValueError(f"update_and_allocate needs the gradients of the AdaLoRA weights, and {n} has "
                                     "none: call it after loss.backward() and before optimizer.zero_grad().")
                if n not in self.ipt:
                    self.ipt[n] = torch.zeros_like(p)
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.exp_avg_unc[n] = torch.zeros_like(p)
                with torch.no_grad():
                    self.ipt[n] = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[n] = self.beta1 * self.exp_avg_ipt[n] + (1 - self.beta1) * self.ipt[n]
                    self.exp_avg_unc[n] = (self.beta2 * self.exp_avg_unc[n] +
                                           (1 - self.beta2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs())

    def _element_score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        value_ipt, vector_ipt, triplet_ipt = {}, {}, {}
        for n, _ in model.named_parameters():
            if f"lora_A.{self.adapter_name}" in n:
                score = torch.mean(self._element_score(n), dim=1, keepdim=True)
                vector_ipt.setdefault(n.replace("lora_A", "%s"), []).append(score)
            if f"lora_B.{self.adapter_name}" in n:
                score = torch.mean(self._element_score(n), dim=0, keepdim=False).view(-1, 1)
                vector_ipt.setdefault(n.replace("lora_B", "%s"), []).append(score)
            if f"lora_E.{self.adapter_name}" in n:
                value_ipt[n.replace("lora_E", "%s")] = self._element_score(n)
        all_score = []
        for name_m, vectors in vector_ipt.items():
            sum_ipt = value_ipt[name_m].view(-1) + torch.cat(vectors, dim=1).sum(dim=1, keepdim=False).view(-1)
            triplet_ipt[name_m % "lora_E"] = sum_ipt.view(-1, 1)
            all_score.append(sum_ipt.view(-1))
        threshold = torch.kthvalue(torch.cat(all_score), k=self.init_bgt - budget)[0].item()
        rank_pattern = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_E.{self.adapter_name}" in n:
                    p.masked_fill_(triplet_ipt[n] <= threshold, 0.0)
                    rank_pattern[n] = (~(triplet_ipt[n] <= threshold)).view(-1).tolist()
        return rank_pattern

    def update_and_allocate(self, model: nn.Module, global_step: int,
                            force_mask: bool = False) -> tuple[int, Optional[dict[str, list[bool]]]]:
        if global_step < self.peft_config.total_step - self.peft_config.tfinal:
            self.update_ipt(model)
        budget, mask_ind = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(model, budget) if mask_ind or force_mask else None
        return budget, rank_pattern

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict) -> None:
        """Re-apply a final pattern (its keys with or without the adapter name, as saving truncates them). A layer
        loaded from a file with this pattern holds only the kept ranks already, and is left as it is (PEFT fails
        there, with a shape mismatch)."""
        truncated = self.adapter_name not in next(iter(rank_pattern.keys()))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_E.{self.adapter_name}" in n:
                    key = n if not truncated else n.replace(f".{self.adapter_name}", "")
                    keep = rank_pattern[key]
                    if len(keep) != p.shape[0] and sum(bool(k) for k in keep) == p.shape[0]:
                        continue
                    mask = torch.Tensor(keep).unsqueeze(-1).to(p.device)
                    p.masked_fill_(~mask.bool(), 0.0)
