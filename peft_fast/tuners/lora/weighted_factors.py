"""The factors add_weighted_adapter combines, per layer type, as PEFT reads and shapes them: linear (and Conv1D)
layers' lora_A / lora_B weights, a convolution's kernels, an embedding's lora_embedding_A / B parameters."""
from __future__ import annotations

import torch

from .embedding import LoraEmbedding


def factors(layer, name: str) -> tuple:
    """(A, B) of adapter `name` as PEFT's add_weighted_adapter reads them: the lora_A / lora_B weights ([r, in],
    [out, r]; a convolution's [r, in, *k], [out, r, 1, ...]), an embedding's lora_embedding_A / B ([r, vocab],
    [dim, r])."""
    embedding_a = getattr(layer, "lora_embedding_A", None)
    if embedding_a is not None and name in embedding_a:
        return embedding_a[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def cast_factors(layer, name: str, dtype: torch.dtype) -> None:
    embedding_a = getattr(layer, "lora_embedding_A", None)
    if embedding_a is not None and name in embedding_a:
        for params in (embedding_a, layer.lora_embedding_B):
            old = params[name]
            params[name] = torch.nn.Parameter(old.data.to(dtype), requires_grad=old.requires_grad)
    else:
        layer.lora_A[name].to(dtype)
        layer.lora_B[name].to(dtype)


def as_matrix(layer, delta: torch.Tensor) -> torch.Tensor:
    """A delta from get_delta_weight as the matrix B·A factors: [out, in] (a convolution's kernel dims flattened
    into in; an embedding's [dim, vocab]; transposed back for fan_in_fan_out), as PEFT's SVD merge shapes it."""
    if delta.dim() > 2:
        delta = delta.flatten(1)
    return delta.T if layer.fan_in_fan_out or isinstance(layer, LoraEmbedding) else delta
