"""LoraEmbedding: PEFT's ``lora.Embedding``, LoRA on torch's nn.Embedding.

Per adapter it trains `lora_embedding_A.<name>` [r, num_embeddings] and `lora_embedding_B.<name>` [embedding_dim, r]
(ParameterDicts: PEFT's file keys `lora_embedding_A` / `lora_embedding_B`, without `.weight`). The looked-up rows
of Aᵀ go through Bᵀ: y = E[x] + s·Aᵀ[x]·Bᵀ, so forward costs one lookup in an [num_embeddings, r] table and an
[r, embedding_dim] matmul per token, never the [num_embeddings, embedding_dim] delta. Merging adds s·(B·A)ᵀ to the
table. As in PEFT, `lora_dropout` is not applied to embeddings, and an `embed_scale` of the base (Gemma's scaled
embeddings) scales the adapters' contribution too. DoRA: dora_layers.py.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...bases import BaseView, EmbeddingView
from ...names import BASE_NAME
from ..injection import base_of
from .dora_layers import DoraEmbeddingVariant
from .layer import LoraLinear
from .variants import LORA, op_args


class _EmbeddingPlan:
    """The base lookup, then each active adapter's contribution in PEFT's order."""

    __slots__ = ("layer", "active")

    def __init__(self, layer, active: list[str]):
        self.layer, self.active = layer, active

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        result = layer.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        scale = layer.embed_scale()
        for name in self.active:
            variant = layer.lora_variant[name]
            if variant is LORA:
                result = layer.add_rows(name, x, result, scale)
            else:
                result = variant.add_embedding(layer, name, x, result, scale)
        return result.to(out_dtype)


class LoraEmbedding(LoraLinear):
    """PEFT's ``lora.Embedding``: same attribute names, same parameter names, same semantics."""

    ties_to_embedding = False  # a tied embedding (T5's encoder/decoder tables) gets its own adapter, as in PEFT

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @classmethod
    def view_for(cls, module: nn.Module, key: Optional[str] = None) -> BaseView:
        if not cls.adapts(module):
            raise ValueError(f"Target module {key} ({type(module).__name__}) is not a torch.nn.Embedding.")
        return EmbeddingView(module)

    @classmethod
    def variant_for(cls, config):
        return DoraEmbeddingVariant() if config.use_dora else LORA

    def _features(self) -> tuple[int, int]:
        # PEFT's orientation: A maps the vocabulary (in) to r, B maps r to the embedding dimension (out).
        return self.base_layer.num_embeddings, self.base_layer.embedding_dim

    def _check_fan_in_fan_out(self, config) -> bool:
        return config.fan_in_fan_out  # kept as PEFT keeps it: an embedding has no orientation to correct

    def _check_config(self, config, r: int) -> None:
        if config.lora_bias:  # PEFT's check and message, before the rank's
            raise ValueError(f"lora_bias={config.lora_bias} is not supported for Embedding.")
        super()._check_config(config, r)

    def _new_factors(self, name: str, r: int, bias: bool) -> None:
        # PEFT draws both factors with randn (consuming the RNG as PEFT does) before initialising them.
        self.lora_embedding_A[name] = nn.Parameter(torch.randn((r, self.in_features)))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn((self.out_features, r)))

    def _initialise(self, name: str, init) -> None:
        """PEFT's: A = 0 and B ~ N(0, 1) for every init that is not False (PEFT's embeddings ignore the others)."""
        if init is False:
            return
        with torch.no_grad():
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def _move_adapter_to_base(self, name: str, autocast_adapter_dtype: bool) -> None:
        for params in (self.lora_embedding_A, self.lora_embedding_B):
            params[name] = nn.Parameter(self.placed(params[name].data, autocast_adapter_dtype))

    def adapter_args(self, name: str) -> tuple:
        """(A, B, scaling, 0.0, None) of adapter `name`: no dropout (PEFT's embeddings have none) and no bias."""
        return op_args(self.lora_embedding_A[name], self.lora_embedding_B[name], None, self.scaling[name], 0.0)

    def has_adapter(self, name: str) -> bool:
        return name in self.lora_embedding_A

    def available_adapters(self) -> list[str]:
        return sorted(self.lora_embedding_A.keys())

    def prepare_mixed(self, slot_names: tuple[str, ...]) -> None:
        """Mixed batches run PEFT's per-adapter loop here: nothing to stack."""

    # --- forward -------------------------------------------------------------------------------------------------
    def embed_scale(self) -> Optional[torch.Tensor]:
        """PEFT's _get_embed_scale: a scalar `embed_scale` of the base (its output is scaled by it), else None."""
        base = self.base_layer
        scale = getattr(base, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(scale, torch.Tensor):
            if scale.numel() == 1:
                return scale
            warnings.warn(f"Found embed_scale attribute with shape {scale.shape}, expected scalar. Embedding scaling "
                          "will not be applied. If this is unexpected, please open an issue at "
                          "https://github.com/huggingface/peft/issues")
        return None

    def embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A lookup in `weight` with the base's settings (padding_idx keeps its row's gradient zero, as PEFT's)."""
        m = self.base_layer
        return F.embedding(x, weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    def _factors(self, name: str, x: torch.Tensor, scale: Optional[torch.Tensor]):
        """(Aᵀ[x], s·Bᵀ·embed_scale): the scalars go into the small [r, dim] factor, not over every token."""
        b = self.lora_embedding_B[name].T * self.scaling[name]
        if scale is not None:
            b = b * scale.to(b.dtype)
        return self.embed(x, self.lora_embedding_A[name].T), b

    def lora_rows(self, name: str, x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """s·Aᵀ[x]·Bᵀ (·embed_scale)."""
        rows, b = self._factors(name, x, scale)
        return rows @ b

    def add_rows(self, name: str, x: torch.Tensor, result: torch.Tensor, scale: Optional[torch.Tensor]):
        """result + s·Aᵀ[x]·Bᵀ (·embed_scale); one addmm when the dtypes agree (no [tokens, dim] temporary)."""
        rows, b = self._factors(name, x, scale)
        if result.dtype != b.dtype or rows.dtype != b.dtype:
            return result + rows @ b  # PEFT's promotion (a 16-bit base under float32 adapters)
        return torch.addmm(result.reshape(-1, b.shape[1]), rows.reshape(-1, b.shape[0]), b).view(result.shape)

    def make_plan(self, x: torch.Tensor):
        active = [a for a in self.active_adapters if a in self.lora_embedding_A]
        if self.merged or not active:
            return self.base_layer
        return _EmbeddingPlan(self, active)

    # Rows split by name in Python, which torch.compile would guard on (a recompile per new mix): run eagerly.
    @torch.compiler.disable
    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """PEFT's Embedding._mixed_batch_forward: each adapter's rows of the batch get its contribution."""
        names = [n for n in dict.fromkeys(adapter_names) if n != BASE_NAME and n in self.lora_embedding_A]
        dora = [n for n in names if self.lora_variant[n].scales_channels]
        if dora:
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
        result = self.base_layer(x, *args, **kwargs)
        scale = self.embed_scale()
        for name in names:
            rows = [i for i, item in enumerate(adapter_names) if item == name]
            result[rows] += self.lora_rows(name, x[rows], scale)
        return result

    # --- merging ---------------------------------------------------------------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """s·(B·A)ᵀ [num_embeddings, embedding_dim], in the adapter's dtype (computed in float32 for 16-bit adapters
        on the CPU, as PEFT does)."""
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        cast = b.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
        delta = ((b.float() @ a.float()) if cast else b @ a).T * self.scaling[name]
        return delta.to(a.dtype) if cast else delta

    def merge_weight(self, name: str, weight: torch.Tensor, ctx, live: bool = False) -> torch.Tensor:
        variant = self.lora_variant[name]
        if variant is LORA:  # PEFT rounds the delta to the table's dtype before adding it, in place or not
            return self.base_view.merge_add(weight, self.get_delta_weight(name).to(weight.dtype), live)
        return variant.merge(self, name, weight, ctx, live)

    def check_merge(self, names: list[str]) -> None:
        """Nothing to refuse: an embedding adapter has no bias."""

    def hotswap_refusal(self) -> Optional[str]:
        return "it is a lora.Embedding (its factors are lora_embedding_A / lora_embedding_B)"

    # --- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        base, r = base_of(target.module), target.kwargs["r"]
        shapes = {"lora_embedding_A": (r, base.num_embeddings), "lora_embedding_B": (base.embedding_dim, r)}
        if config.use_dora:
            shapes["lora_magnitude_vector"] = (base.embedding_dim,)
        return shapes

    def __repr__(self) -> str:
        # PEFT's name for this layer type, which get_layer_status reports.
        return "lora.Embedding" + nn.Module.__repr__(self)[len(type(self).__name__):]
