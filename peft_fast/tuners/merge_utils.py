"""Task-vector merging (task arithmetic, magnitude pruning, TIES, DARE): PEFT's ``peft.utils.merge_utils``.

Same functions, signatures and results as PEFT 0.21.2. Every function takes a list of same-shaped tensors (one per
task/adapter) and a 1-D tensor of weights, one per task, and returns one merged tensor. The random pruning of DARE
draws its masks with ``torch.bernoulli`` on the global generator, one tensor at a time in list order, as PEFT does:
under the same seed both libraries draw the same masks.

One deviation: PEFT's DARE rescale divides by ``density`` even when it is 0 and returns NaN; here ``density=0``
prunes everything and returns zeros (the same mask draws are still made, so the random stream stays in step).
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch

__all__ = [
    "calculate_majority_sign_mask", "dare_linear", "dare_ties", "disjoint_merge", "magnitude_based_pruning",
    "magnitude_prune", "prune", "random_pruning", "reshape_weight_task_tensors", "task_arithmetic", "ties",
]


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` viewed with trailing singleton dimensions, so it broadcasts over stacked ``task_tensors``."""
    return weights.view(tuple(weights.shape) + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    flat = tensor.reshape(-1)
    keep = torch.topk(flat.abs(), k=int(density * tensor.numel()), largest=True).indices
    mask = torch.zeros_like(flat)
    mask[keep] = 1
    return tensor * mask.view(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability ``density`` (one Bernoulli draw per entry); with ``rescale``, divide the
    survivors by ``density`` so that the expected value is unchanged."""
    mask = torch.bernoulli(torch.full_like(tensor, density))
    pruned = tensor * mask
    if rescale and density > 0:  # PEFT divides by 0 here and returns NaN; nothing survives, so zeros are right
        pruned = pruned / density
    return pruned


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    """Prune ``tensor`` to the fraction ``density`` of its entries by ``method`` ("magnitude" or "random")."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Boolean mask, per task (dim 0), of the entries whose sign agrees with the elected sign. "total" elects the
    sign of the sum of the values, "frequency" the sign held by most tasks; ties go to +1."""
    sign = tensor.sign()
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean, over the tasks that agree with the elected sign, of each entry (0 where none agrees)."""
    kept = (task_tensors * majority_sign_mask).sum(dim=0)
    return kept / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def _weighted_sum(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    return (stacked * reshape_weight_task_tensors(stacked, weights)).sum(dim=0)


def _weighted_disjoint(task_tensors: list[torch.Tensor], weights: torch.Tensor, method: str) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    mask = calculate_majority_sign_mask(stacked, method=method)  # the sign is elected before weighting
    return disjoint_merge(stacked * reshape_weight_task_tensors(stacked, weights), mask)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i weights[i] · task_tensors[i]."""
    return _weighted_sum(task_tensors, weights)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Task arithmetic over the tensors magnitude-pruned to ``density``."""
    return _weighted_sum([prune(t, density, method="magnitude") for t in task_tensors], weights)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES: magnitude-prune each tensor to ``density``, elect a sign per entry, average the agreeing entries."""
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _weighted_disjoint(pruned, weights, majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: randomly drop entries (keep probability ``density``), rescale by 1/density, then task arithmetic."""
    return _weighted_sum([prune(t, density, method="random", rescale=True) for t in task_tensors], weights)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """DARE pruning followed by TIES' sign election and disjoint merge."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _weighted_disjoint(pruned, weights, majority_sign_method)
