"""What a LoRA layer computes, written against PEFT's attribute names (lora_A, lora_B, lora_dropout, scaling,
lora_magnitude_vector, base_layer, active_adapters, merged), so that the same code runs peft_fast's LoraLinear and,
adopted in place, Hugging Face PEFT's own lora.Linear / lora.bnb.Linear4bit layers (peft_layers.py).

Forward runs the layer's launch plan (TunerLayer.plan): decided once per plan key, it is the base module alone,
one fused op for a single adapter over a fusable base (`variant.fused`), or the base module followed by each
adapter's step in PEFT's order (`loop`). A class mixing this in provides `variant(name)`, `base_view`, `plan` and
`_stack_cache`.
"""
from __future__ import annotations

import contextlib
import functools
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from ...batching import PREPARE_LOCK, AdapterNames
from ...kernels import multi_lora_, use_triton
from ...bases.view import global_hooks, must_call, offloaded, onloaded
from .stacks import AdapterStacks, StackCache, stack_dtype
from .variants import op_args


class _LoraPlan:
    """What forward runs: the fused op of a single adapter when there is one (and no extra forward arguments),
    else the base module followed by PEFT's adapter loop."""

    __slots__ = ("layer", "active", "fused")

    def __init__(self, layer, active: list[str], fused):
        self.layer, self.active, self.fused = layer, active, fused

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # (hooks may be registered on an adapter's modules at any time, with no event: checked per call)
        if self.fused is not None and not (args or kwargs or self.layer.calls_modules(self.active)):
            return self.fused(x)
        return self.layer.loop(x, self.layer.base_layer(x, *args, **kwargs), self.active)


_NO_ADAPTERS = AdapterStacks(*(None,) * 5)  # _readied_stacks: a layer left without adapters

# A LoRA layer's per-adapter modules, as PEFT calls them
_ADAPTER_MODULES = ("lora_dropout", "lora_A", "lora_B", "lora_magnitude_vector")


class LoraCompute:
    def adapter_args(self, name: str) -> tuple:
        """(A, B, scaling, dropout p, B's bias) of adapter `name` as the ops take them (variants.op_args)."""
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        b_params = self.lora_B._modules[name]._parameters
        return op_args(self.lora_A._modules[name]._parameters["weight"], b_params["weight"], b_params.get("bias"),
                       self.scaling[name], p)

    def adapter_reader(self, name: str):
        """`adapter_args(name)` as a callable for a launch plan: the same reads at every call (dicts, modules,
        parameters, scaling, dropout state, so a replaced dict or entry is seen), through the module's own dicts
        rather than nn.Module's attribute lookup."""
        if "adapter_args" in vars(self) or type(self).adapter_args is not LoraCompute.adapter_args:
            return functools.partial(self.adapter_args, name)  # a layer reading its adapters another way
        modules, attrs = self._modules, vars(self)

        def read() -> tuple:
            dropout = modules["lora_dropout"]._modules[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
            b_params = modules["lora_B"]._modules[name]._parameters
            return op_args(modules["lora_A"]._modules[name]._parameters["weight"], b_params["weight"],
                           b_params.get("bias"), attrs["scaling"][name], p)

        return read

    def calls_modules(self, names) -> bool:
        """Whether a module of these adapters must run as a module (bases/view.py `must_call`: hooks, a replaced
        forward, parametrized weights), as PEFT runs them all: then the adapters run PEFT's steps, module by
        module (`module_step`), instead of ops reading their weights."""
        if global_hooks():
            return True
        modules = self._modules
        for key in _ADAPTER_MODULES:
            part = modules.get(key)
            if part is not None:
                for name in names:
                    m = part._modules.get(name)
                    if m is not None and must_call(m):
                        return True
        return False

    def _plain_factors(self, name: str) -> bool:
        return all("weight" in self._modules[k]._modules[name]._parameters for k in ("lora_A", "lora_B"))

    def module_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """PEFT's plain LoRA delta through the modules: lora_B(lora_A(dropout(x))) · s."""
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]

    def module_step(self, name: str, x: torch.Tensor, result: torch.Tensor, q4: bool, out_dtype) -> torch.Tensor:
        """PEFT's step for adapter `name` after the base output, calling its modules (x already cast)."""
        variant = self.variant(name)
        if variant.scales_channels:
            return variant.add_modules(self, name, x, result)
        d = self.module_delta(name, x)
        return result + (d.to(out_dtype) if q4 else d)

    # --- forward -------------------------------------------------------------------------------------------------
    def make_plan(self, x: torch.Tensor):
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active:
            return self.base_layer
        # (made while hooks are there too, which each call checks; not over parametrized or pruned factors, whose
        # weight exists only while they run)
        fused = self.variant(active[0]).fused(self, active[0], x) \
            if len(active) == 1 and self._plain_factors(active[0]) else None
        return _LoraPlan(self, active, fused)

    def loop(self, x: torch.Tensor, result: torch.Tensor, active: list[str]) -> torch.Tensor:
        """PEFT's adapter loop after the base output `result`: its dense `lora.Linear` order (the sum cast once) or
        its bnb `Linear4bit`/`Linear8bitLt` order (each delta cast to the output dtype, x kept cast to the adapter
        dtype)."""
        q4 = self.base_view.bnb_order
        modules = self.calls_modules(active)
        dora = any(self.variant(n).scales_channels for n in active)
        if dora and self._offloaded_dora():
            with self._dora_onloaded():
                return self._loop(x, result, active, q4, modules, True)
        return self._loop(x, result, active, q4, modules, q4 or modules or dora)

    def _loop(self, x: torch.Tensor, result: torch.Tensor, active: list[str], q4: bool, modules: bool,
              cast: bool) -> torch.Tensor:
        out_dtype = result.dtype
        for name in active:
            if cast:
                x = x.to(self.lora_A[name].weight.dtype)
            if modules:
                result = self.module_step(name, x, result, q4, out_dtype)
            else:
                result = self.variant(name).add(self, name, x, result, q4, out_dtype)
            if q4:
                result = result.to(out_dtype)
        return result.to(out_dtype)

    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        result = self.base_layer(x, *args, **kwargs)
        if self._offloaded_dora():
            with self._dora_onloaded():
                return self._mixed_deltas(x, result, adapter_names)
        return self._mixed_deltas(x, result, adapter_names)

    def _offloaded_dora(self) -> bool:
        """DoRA adapters over a base accelerate offloaded: their scales read its weight, brought in for them. (Not
        in compiled code, which accelerate's hooks are not: a check there would guard on the adapters' number.)"""
        return not torch.compiler.is_compiling() and bool(self._modules["lora_magnitude_vector"]._modules) \
            and offloaded(self.base_layer)

    @contextmanager
    def _dora_onloaded(self) -> Iterator[None]:
        with onloaded(self, base_only=True):
            try:
                yield
            finally:
                for variant in self.lora_variant.values():  # DoRA's eval cache keys on the onloaded weight
                    variant.clear()

    def _mixed_deltas(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        stacks = self._readied_stacks(adapter_names, x)
        if stacks is _NO_ADAPTERS or (stacks is None and not self.lora_A):
            return result  # every adapter of this layer deleted: it is its base until one is added
        # One shrink and one expand for the whole batch, whatever the number of adapters in it. Nothing here reads
        # the names: under torch.compile another mix of adapters reuses the graph. Unless an adapter module must
        # run as a module (hooks, parametrized weights: checked where the stacks are written, at events).
        if stacks is None and isinstance(adapter_names, AdapterNames) and not self._needs_grad(x):
            stacks = self._stacks(adapter_names.slot_names, x)
        if stacks is not None and not stacks.modules:
            x2d, y2d = x.reshape(-1, self.in_features), result.reshape(-1, self.out_features)
            multi_lora_(x2d, y2d, stacks.a, stacks.b, stacks.ranks, stacks.scalings, adapter_names.meta_for(x),
                        stacks.bias,  # added in place: the base output is ours and needs no autograd
                        dora_scale=stacks.dora_scale,
                        base_bias=self.base_view.bias.detach() if stacks.dora_scale is not None and
                        self.base_view.bias is not None else None)
            return result
        if not any(n in self.lora_A for n in set(adapter_names)):
            return result
        # Gradients wanted (or a caller passed a plain list): PEFT's per-adapter loop, differentiable.
        q4 = self.base_view.bnb_order
        for name in set(adapter_names):
            if name == "__base__" or name not in self.lora_A:
                continue
            rows = [i for i, item in enumerate(adapter_names) if item == name]
            if self.calls_modules([name]):  # PEFT's _mixed_batch_forward step
                sub = x[rows].to(self.lora_A[name].weight.dtype)
                if self.variant(name).scales_channels:
                    result[rows] = self.module_step(name, sub, result[rows], q4, result.dtype).to(result.dtype)
                else:
                    result[rows] += self.module_delta(name, sub).to(result.dtype)
            else:
                x = self.variant(name).mixed_rows(self, name, x, result, rows, q4)
        return result

    def _needs_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector)
                                      for p in d.parameters())

    def _readied_stacks(self, adapter_names, x: torch.Tensor):
        """In a compiled forward of a batch whose model readied its layers (the batch plan's prepare_mixed, after
        the last event): the stacks as prepared, without comparing slot tables or listing this layer's adapters,
        which would make the graph guard on the adapters' names and number, and recompile with every adapter
        added. _NO_ADAPTERS: the layer has none. None: take the checked route (eager calls, gradients, a layer
        not readied or readied for another dtype)."""
        if not (torch.compiler.is_compiling() and getattr(adapter_names, "prepared", False)) \
                or torch.is_grad_enabled() or self.training or getattr(self, "_stack_dirty", True):
            return None
        cache = self._stack_cache
        if cache is None:
            return _NO_ADAPTERS
        on_triton = use_triton(x)
        if cache.dtype != stack_dtype(x, cache.adapter_dtype, on_triton) or cache.b_rank_major == on_triton:
            return None
        return cache.stacks

    def _stacks(self, slot_names: tuple[str, ...], x: torch.Tensor) -> AdapterStacks:
        """The adapter slots for the batched kernels (stacks.py), written only where an adapter changed. In eval mode
        they change only with the layer's events (adding, loading, deleting, merging, hotswaps, load_state_dict,
        train() / eval()), so they are reused without looking at any parameter, as serving needs (and as a
        compiled forward must); after an event, or in training mode, each slot's parameters are checked."""
        adapter_dtype = next(iter(self.lora_A.values())).weight.dtype
        on_triton = use_triton(x)
        dtype, b_rank_major = stack_dtype(x, adapter_dtype, on_triton), not on_triton  # the reference's layout
        cache = self._stack_cache
        if (cache is None or cache.dtype != dtype or cache.b_rank_major != b_rank_major or self.training
                or getattr(self, "_stack_dirty", True) or cache.slot_names != slot_names):
            # Shared by the threads serving this model; never inference tensors, which a later update outside
            # torch.inference_mode could not write
            with PREPARE_LOCK, torch.inference_mode(False):
                cache = self._stack_cache
                if cache is None or cache.dtype != dtype or cache.b_rank_major != b_rank_major:
                    cache = self._stack_cache = StackCache(self, slot_names, dtype, b_rank_major=b_rank_major)
                else:
                    cache.update(self, slot_names)  # only the slots whose adapter changed are written
                cache.adapter_dtype = adapter_dtype
                self._stack_dirty = False
        return cache.stacks

    def prepare_mixed(self, slot_names: tuple[str, ...]) -> None:
        """The stacks for activations of the base's dtype on its device, built before the forward."""
        if not self.lora_A:
            return
        view = self.base_view
        with self._dora_onloaded() if self._offloaded_dora() else contextlib.nullcontext():
            self._stacks(slot_names, torch.empty(0, dtype=view.dense_dtype, device=view.device))


