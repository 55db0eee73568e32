"""LoraLinear: the thin module that replaces a target linear layer. It owns parameters; kernels do the math.

Same attribute and parameter names as PEFT's `lora.Linear`. Each adapter has a variant (variants.py: plain LoRA,
dora.py: DoRA), chosen when the adapter is created. What forward computes is compute.py's (shared with PEFT's own
layers when peft_fast accelerates them in place); this file holds the adapters' state, PEFT's merge rule and the
file layout. LoraEmbedding (embedding.py) and LoraConv1d/2d/3d (conv.py) subclass it for PEFT's lora.Embedding and
lora.Conv*, overriding the hooks under "what a layer type changes" and the forward, merge and file rules.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from ...batching import PREPARE_LOCK
from ..base_layer import TunerLayer
from . import init as lora_init
from .compute import LoraCompute
from .dora import DoraVariant
from .stacks import StackCache
from .variants import LORA


def _same_view(param: torch.Tensor, view: torch.Tensor) -> bool:
    return param.data_ptr() == view.data_ptr() and param.shape == view.shape and param.stride() == view.stride()


def variant_for(config):
    """The variant an adapter with this config gets: where `use_dora` is read, and nowhere else."""
    return DoraVariant() if config.use_dora else LORA


class _MergeContext:
    __slots__ = ("w0", "norms")

    def __init__(self, w0: Optional[torch.Tensor]):
        self.w0 = w0  # the base with every merged adapter taken out (only when a DoRA adapter is merged)
        self.norms: dict[str, torch.Tensor] = {}  # DoRA: the norm each adapter's merge used


class LoraLinear(LoraCompute, TunerLayer):
    """PEFT's ``lora.Linear``: same attribute names, same parameter names, same semantics."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")
    extra_adapter_dicts = ("use_rslora", "use_dora", "lora_bias", "lora_magnitude_vector", "lora_variant",
                           "tied_adapters")
    file_key_renames = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}  # PEFT's DoRA key
    rescalable = True
    ties_to_embedding = True  # a tied output layer's factors can be views of the input embedding's (tied.py)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, lora_alpha: float,
                 autocast_adapter_dtype: bool = True, tied: Optional[nn.Module] = None):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        # PEFT keeps these (empty for linear layers); kept so module trees and names line up one to one.
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_variant: dict[str, Any] = {}
        # adapter -> the input embedding's LoRA layer whose factors this layer's are views of (tied.py)
        self.tied_adapters: dict[str, nn.Module] = {}
        self._stack_cache: Optional[StackCache] = None
        self._active_adapter = [adapter_name]
        self.fan_in_fan_out = self._check_fan_in_fan_out(config)
        self.in_features, self.out_features = self._features()
        self.update_layer(adapter_name, config, r, lora_alpha, autocast_adapter_dtype, tied)

    def _features(self) -> tuple[int, int]:
        """(in_features, out_features) as PEFT's layer of this type names them."""
        return self.base_view.in_features, self.base_view.out_features

    def _check_fan_in_fan_out(self, config) -> bool:
        if self.base_view.fan_in_fan_out:
            if not config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                              "Setting fan_in_fan_out to True.")
                config.fan_in_fan_out = True
            return True
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.")
            config.fan_in_fan_out = False
        return False

    # --- adapters ------------------------------------------------------------------------------------------------
    def update_layer(self, name: str, config, r: int, lora_alpha: float, autocast_adapter_dtype: bool = True,
                     tied: Optional[nn.Module] = None) -> None:
        self._check_config(config, r)
        variant = self.variant_for(config)
        variant.check(self, config)
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.lora_dropout[name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        # A new module starts in training mode; follow the layer, so an adapter added to a model in eval mode does
        # not drop out (PEFT 0.21 leaves it training until the next .eval()).
        self.lora_dropout[name].train(self.training)
        self._new_factors(name, r, config.lora_bias)
        self.tied_adapters.pop(name, None)
        if tied is not None:  # before the initialisation, which then writes into the embedding's factors (PEFT)
            self._tie(name, tied)
        self.lora_bias[name] = config.lora_bias
        self.use_rslora[name] = config.use_rslora
        self.use_dora[name] = variant.name == "dora"  # PEFT's attribute, for introspection
        self.lora_variant[name] = variant
        self.scaling[name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self._initialise(name, config.init_lora_weights)
        self._move_adapter_to_base(name, autocast_adapter_dtype)
        if tied is not None:  # a cast to the adapter dtype made new tensors
            self._tie(name, tied)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        variant.init(self, name)  # DoRA: the magnitude, from the initialised adapter, on the base's device
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- tied to the input embedding (ensure_weight_tying, tied.py) ------------------------------------------------
    def _tie(self, name: str, embedding: nn.Module) -> None:
        """Make this adapter's factors views of the embedding's: A = its Bᵀ, B = its Aᵀ, so that both layers add the
        same delta and train the same numbers (one storage, one version counter, so caches see every update)."""
        a, b = embedding.lora_embedding_B[name].t(), embedding.lora_embedding_A[name].t()
        if a.shape != self.lora_A[name].weight.shape or b.shape != self.lora_B[name].weight.shape:
            raise ValueError(f"ensure_weight_tying: the input embedding's factors {tuple(a.shape)}/{tuple(b.shape)} "
                             f"do not fit this layer's {tuple(self.lora_A[name].weight.shape)}/"
                             f"{tuple(self.lora_B[name].weight.shape)}; the tied layers must have one size.")
        for module, view in ((self.lora_A[name], a), (self.lora_B[name], b)):
            # Swapped in place: the Parameter objects an optimizer holds stay the layer's (model.to() after the
            # optimizer was built, as Trainer/Accelerate do, must not orphan them).
            torch.utils.swap_tensors(module.weight, nn.Parameter(view, requires_grad=module.weight.requires_grad))
        self.tied_adapters[name] = embedding

    def _merged_by_embedding(self, name: str) -> bool:
        """A tied adapter on a layer that shares the embedding's weight: the embedding's merge adds the (same) delta
        to that one weight, so this layer's must not add it again (PEFT adds it twice)."""
        embedding = self.tied_adapters.get(name)
        weight = getattr(self.base_layer, "weight", None)
        return embedding is not None and weight is not None and getattr(embedding.base_layer, "weight", None) is weight

    def _apply(self, fn, recurse: bool = True):
        # model.to(...) / .half() convert each parameter on its own, which would untie the factors; the embedding
        # comes first in module order, so its converted factors are there to view again.
        out = super()._apply(fn, recurse)
        self._retie()
        return out

    def __setstate__(self, state) -> None:
        # A deep copy or unpickling copies each parameter on its own: nothing holds the copy's factors yet, so they
        # are swapped for views again (sharing the embedding's version counter, as when created).
        super().__setstate__(state)
        for name, embedding in self.tied_adapters.items():
            if name in getattr(embedding, "lora_embedding_B", {}):
                self._tie(name, embedding)

    def _retie(self) -> None:
        """After a conversion (model.to(), .half()), point the factors at the embedding's converted ones again,
        through `.data`: the Parameter objects keep their identity, gradients and hooks (an optimizer built before
        model.to() keeps training them), and a graph holding them does not block the move."""
        for name, embedding in self.tied_adapters.items():
            if name not in embedding.lora_embedding_B:  # the embedding's adapter deleted on its own
                continue
            for param, source in ((self.lora_A[name].weight, embedding.lora_embedding_B[name]),
                                  (self.lora_B[name].weight, embedding.lora_embedding_A[name])):
                view = source.detach().t()
                if (source.device, source.dtype) == (param.device, param.dtype) and not _same_view(param, view):
                    param.data = view

    # --- what a layer type changes (embedding.py, conv.py) ----------------------------------------------------------
    @classmethod
    def variant_for(cls, config):
        return variant_for(config)

    def _check_config(self, config, r: int) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if config.lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {type(self.base_layer).__name__} "
                          "has no bias. This means that merging LoRA weights won't be possible.")

    def _new_factors(self, name: str, r: int, bias: bool) -> None:
        # Same module types, created in the same order as PEFT: under one seed both draw identical weights.
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=bias)

    def _initialise(self, name: str, init) -> None:
        lora_init.initialise(self, name, init)

    def _move_adapter_to_base(self, name: str, autocast_adapter_dtype: bool) -> None:
        # PEFT moves the adapter to the base layer's device and dtype (a 4-bit layer's compute dtype), then upcasts
        # half precision to float32.
        view = self.base_view
        for mod in (self.lora_A, self.lora_B):
            mod[name] = mod[name].to(view.device, dtype=view.init_dtype)
            if autocast_adapter_dtype and mod[name].weight.dtype in (torch.float16, torch.bfloat16):
                mod[name] = mod[name].to(torch.float32)

    def _clear_caches(self) -> None:
        self._stack_dirty = True  # the slots stay allocated; the next mixed batch rewrites the ones that changed
        for variant in self.lora_variant.values():
            variant.clear()

    def refresh(self, base: bool = True) -> None:
        # Only DoRA's values depend on the base weight; otherwise the base view's (a bitsandbytes conversion) stay:
        # Trainer calls train() every step
        super().refresh(base=base and len(self.lora_magnitude_vector) > 0)

    def train(self, mode: bool = True):
        # A switch between training and eval rewrites every slot: the slots copy the adapters, and an edit in place
        # through .data bumps no version. A call that keeps the mode (a server's eval() per request, Trainer's
        # train() per step) rewrites only the slots whose adapter's parameters changed (README, "Stacks").
        if mode != self.training and self._stack_cache is not None:
            with PREPARE_LOCK:  # not amid another thread's update of the slots
                self._stack_cache.forget()
        return super().train(mode)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if not self.lora_A and self._stack_cache is not None:  # nothing left to serve here: the stacks' memory goes
            with PREPARE_LOCK:
                self._stack_cache = None

    def variant(self, name: str):
        return self.lora_variant[name]

    # --- merging: LoRA's rule (the bookkeeping is tuners/merging.py) ----------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        # CPU matmuls in half precision are slow and lossy: PEFT computes them in float32 and casts back.
        cast = a.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
        delta = (b.float() @ a.float()) if cast else b @ a
        delta = (delta.T if self.fan_in_fan_out else delta) * self.scaling[name]
        return delta.to(b.dtype) if cast else delta

    def check_merge(self, names: list[str]) -> None:
        tied_dora = [n for n in names if self._merged_by_embedding(n) and self.lora_variant[n].scales_channels]
        if tied_dora:
            raise ValueError(f"Cannot merge DoRA adapter(s) {tied_dora} tied to the input embedding "
                             "(ensure_weight_tying): the two layers scale the shared weight differently, which one "
                             "merged weight cannot hold. Untie the embeddings first (load the model with "
                             "tie_word_embeddings=False).")
        if any(self.lora_bias[n] for n in names) and getattr(self.base_layer, "bias", None) is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")

    def merge_context(self, names: list[str], weight: torch.Tensor) -> _MergeContext:
        if not any(self.lora_variant[n].scales_channels for n in names):
            return _MergeContext(None)
        return _MergeContext(self._unmerged_base(weight.detach().clone()))

    def _unmerged_base(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (a copy of the base weight) with the layer's merged adapters taken out, newest first."""
        for name in reversed(self.merged_adapters):
            if not self.has_adapter(name):
                continue
            variant = self.lora_variant[name]
            if variant.scales_channels:
                weight = variant.unmerge(self, name, weight, False)
            else:
                weight = weight - self.get_delta_weight(name).to(weight.dtype)
        return weight

    def merge_weight(self, name: str, weight: torch.Tensor, ctx: _MergeContext, live: bool = False) -> torch.Tensor:
        if self._merged_by_embedding(name):
            return weight
        return self.lora_variant[name].merge(self, name, weight, ctx, live)

    def merge_bias(self, name: str, bias: Optional[torch.Tensor], live: bool = False) -> Optional[torch.Tensor]:
        if self.lora_bias[name]:
            bias += self.lora_B[name].bias.data * self.scaling[name]  # in place: rounded once to bias's dtype, as PEFT
        return bias

    def merge_done(self, ctx: _MergeContext) -> None:
        for name in ctx.norms:
            self.lora_variant[name].merge_done(self, name, ctx)

    def unmerge_weight(self, name: str, weight: torch.Tensor, live: bool = False) -> torch.Tensor:
        if self._merged_by_embedding(name):
            return weight
        return self.lora_variant[name].unmerge(self, name, weight, live)

    def unmerge_bias(self, name: str, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.lora_bias[name]:
            bias -= self.lora_B[name].bias.data * self.scaling[name]
        return bias

    def unmerge_done(self, name: str) -> None:
        self.lora_variant[name].unmerge_done()

    # --- files ---------------------------------------------------------------------------------------------------
    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        r, out_f, in_f = target.kwargs["r"], target.out_features, target.in_features
        shapes = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}
        if config.lora_bias:
            shapes["lora_B.bias"] = (out_f,)
        return {**shapes, **variant_for(config).file_tensors(out_f)}

    # --- hot-swapping (hotswap.py) ----------------------------------------------------------------------------------
    def factor_shapes(self, r: int) -> dict[tuple[str, str], tuple[int, ...]]:
        """(module dict, parameter) -> shape of an adapter of rank r, for the parts hot-swapping copies."""
        return {("lora_A", "weight"): (r, self.in_features), ("lora_B", "weight"): (self.out_features, r),
                ("lora_B", "bias"): (self.out_features,)}

    def hotswap_refusal(self) -> Optional[str]:
        """Why this layer's adapters cannot be hot-swapped in place, or None."""
        return None

    def __repr__(self) -> str:
        # PEFT's name for this layer type, which get_layer_status reports and users grep for.
        return "lora.Linear" + super().__repr__()[len(type(self).__name__):]
