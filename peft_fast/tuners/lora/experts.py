"""LoraParam: LoRA on a parameter (PEFT's `lora.ParamWrapper`, what `LoraConfig.target_parameters` creates), above
all the 3-D expert stacks of transformers' mixture-of-experts layers.

Same structure, names and files as PEFT: one wrapper per targeted parameter, nested when several parameters of one
module are targeted (the first the module registers innermost, so its file keys read `experts.base_layer.lora_A...`;
param_targets.py plans them), each with `lora_A` [r·E, in] and `lora_B` [out, r·E]: expert e's pair is
A[e·r:(e+1)·r] and B[:, e::E]. A 2-D parameter is one expert. PEFT's limits hold: no dropout, DoRA, lora_bias or
fan_in_fan_out.

Forward: the outermost wrapper runs the experts layer itself (bases/experts.py), with each wrapper's grouped LoRA
delta added after the projection of its parameter. Mixed batches (`adapter_names`, which PEFT refuses here) run the
multi-adapter kernels with one slot per (adapter, expert). Merging adds B·A per expert into the stack, as PEFT does;
a 4-bit stack (bases/nf4_experts.py) is dequantized and re-quantized.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from ...bases.experts import Routing, experts_forward, is_experts_module, stack_shape
from ...bases.nf4_experts import is_nf4_experts
from ...bases.view import BaseView
from ...batching import AdapterNames, batch_for
from ...kernels import make_lora_batch_meta, multi_lora
from ...kernels.grouped_lora import grouped_lora
from ...names import BASE_NAME
from ..base_layer import TunerLayer
from . import init as lora_init


def innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, LoraParam):
        module = module.base_layer
    return module


class ParamView(BaseView):
    """A targeted parameter as a base: [E, out, in] (or [E, in, out] for transposed experts), [out, in] in 2-D. A
    4-bit expert stack (bases/nf4_experts.py) reads dequantized and is re-quantized when merges write it."""

    def __init__(self, module: nn.Module, parameter_name: str):
        super().__init__(module)
        self.parameter_name = parameter_name
        self.experts = innermost(module)
        shape = stack_shape(self.experts, parameter_name)
        if shape is None:
            shape = getattr(self.experts, parameter_name).shape
        transposed = getattr(self.experts, "is_transposed", False)
        self.ndim = len(shape)
        if len(shape) == 3:
            self.num_experts = shape[0]
            self._in, self._out = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        elif len(shape) == 2:
            self.num_experts, self._in, self._out = 1, shape[1], shape[0]
        else:
            raise ValueError(f"target_parameters: {parameter_name} has {len(shape)} dimensions; 2-D and 3-D "
                             "parameters are supported.")

    @property
    def quantized(self) -> bool:
        return is_nf4_experts(self.experts) and self.parameter_name in self.experts._nf4_names

    @property
    def param(self) -> torch.Tensor:
        """The parameter (dense), or the dequantized 4-bit stack."""
        return getattr(self.experts, self.parameter_name)

    @property
    def stored(self) -> torch.Tensor:
        """What holds the values: the parameter, or the packed codes of a 4-bit stack."""
        return self.experts.packed(self.parameter_name) if self.quantized else self.param

    @property
    def weight(self) -> torch.Tensor:
        return self.param

    @property
    def bias(self):
        return None

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    @property
    def device(self) -> torch.device:
        return self.stored.device

    @property
    def dtype(self) -> torch.dtype:
        return self.experts.nf4_state(self.parameter_name).dtype if self.quantized else self.param.dtype

    def read_weight(self) -> torch.Tensor:
        return self.experts.dequantize(self.parameter_name) if self.quantized else self.param.data

    def write_weight(self, weight: torch.Tensor) -> None:
        if self.quantized:
            self.experts.requantize(self.parameter_name, weight)
        else:
            self.param.data = weight

    def make_dense(self) -> None:
        """merge_and_unload(dequantize=True): the experts module back to dense stacks, merged exactly."""
        if is_nf4_experts(self.experts):
            self.experts.to_dense()

    def merge_add(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        return weight + delta.to(weight.dtype)

    def merge_sub(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        return weight - delta.to(weight.dtype)

    def mergeable(self) -> bool:
        return True

    def check(self, name: str) -> None:
        pass

    def version(self) -> tuple:
        p = self.stored
        return (id(p), p.data_ptr(), p._version, p.device, p.dtype)

    def key_objects(self) -> tuple:
        return (self.stored,)


def grouped_delta_fn(wrapper, active: list[str], factors):
    """(rows sorted by expert, routing) -> the sum of the active adapters' grouped deltas; `factors(name)` gives
    an adapter's (A [E, r, in], B [E, out, r]). Wrappers: ours, or PEFT's ParamWrapper (peft_layers.py)."""
    def delta(x: torch.Tensor, routing: Routing) -> torch.Tensor:
        out = None
        for name in active:
            a3, b3 = factors(name)
            d = grouped_lora(x, a3, b3, wrapper.scaling[name], routing.meta, rows_sorted=True)
            out = d if out is None else out + d
        return out
    return delta


def _mixed_rows(routing: Routing, batch, num_experts: int):
    """(each row's sample slot, the rows grouped by (adapter, expert) slot) of a mixed batch, made once per forward
    and shared by the projections."""
    key = ("mixed", id(batch), num_experts)
    if key not in routing.shared:
        per_sample = routing.num_tokens // len(batch)
        sample = batch.sample_slots.to(routing.token_of_row.device).long().repeat_interleave(per_sample)
        sample = sample[routing.token_of_row]
        ok = (sample >= 0) & (routing.expert_ids < num_experts)
        slots = torch.where(ok, sample * num_experts + routing.expert_ids.clamp(max=num_experts - 1), -1)
        routing.shared[key] = (sample, make_lora_batch_meta(slots, len(batch.slot_names) * num_experts,
                                                            validate=False))
    return routing.shared[key]


def expert_factors(wrapper, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [E, r, in], B [E, out, r]) of adapter `name` of a parameter wrapper (ours, or PEFT's own ParamWrapper,
    which has the same attributes): views of PEFT's `lora_A` [r·E, in] and `lora_B` [out, r·E]."""
    a, b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
    E, r = wrapper.num_experts, wrapper.r[name]
    return a.view(E, r, a.shape[1]), b.view(b.shape[0], r, E).permute(2, 0, 1)


class LoraParam(TunerLayer):
    """PEFT's ``lora.ParamWrapper``: same attributes (parameter_name, num_experts, lora_A/lora_B), same files."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_bias")
    rescalable = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int, lora_alpha: float,
                 parameter_name: str, autocast_adapter_dtype: bool = True):
        self._parameter_name = parameter_name
        super().__init__(base_layer)
        for field, bad in (("lora_dropout", config.lora_dropout), ("fan_in_fan_out", config.fan_in_fan_out),
                           ("lora_bias", config.lora_bias), ("use_dora", config.use_dora)):
            if bad:  # PEFT's limits: dropout cannot be factored out of a weight delta, and so on
                raise ValueError(f"lora.ParamWrapper does not work with {field}={bad!r} (target_parameters "
                                 f"{parameter_name!r}); target the module with target_modules instead.")
        self.parameter_name = parameter_name
        self._b_cache: dict = {}  # adapter -> B in the kernels' layout, while B does not change (kernel_factors)
        self._mixed_cache = None  # the mixed-batch stacks and what they were built from (_mixed_stacks)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}
        self._active_adapter = [adapter_name]
        view = self.base_view
        self.num_experts, self.in_features, self.out_features = view.num_experts, view.in_features, view.out_features
        self.update_layer(adapter_name, config, r, lora_alpha, autocast_adapter_dtype)

    @classmethod
    def view_for(cls, module: nn.Module, key: Optional[str] = None) -> BaseView:
        raise TypeError("LoraParam's base is a parameter: its view comes from the layer (base_view)")

    @classmethod
    def adapter_home(cls, module: nn.Module, target) -> Optional["LoraParam"]:
        """The wrapper of the target's parameter in the chain at the target's path (later adapters join it)."""
        name = target.kwargs["parameter_name"]
        while isinstance(module, LoraParam):
            if module.parameter_name == name:
                return module
            module = module.base_layer
        return None

    @classmethod
    def wraps(cls, layer: TunerLayer) -> bool:
        return isinstance(layer, LoraParam)  # one wrapper per targeted parameter of a module, nested

    @property
    def base_view(self) -> BaseView:
        view = self._view
        if view is None or view.module is not self.base_layer:
            view = self._view = ParamView(self.base_layer, self._parameter_name)
        return view

    def update_layer(self, name: str, config, r: int, lora_alpha: float, autocast_adapter_dtype: bool = True,
                     parameter_name: Optional[str] = None) -> None:
        """Add adapter `name` (`parameter_name`: the planned target's, which is this wrapper's own)."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        init = config.init_lora_weights
        E = self.num_experts
        # (orthogonal reads no base weight: PEFT makes it for a 2-D parameter; its factors have no expert axis)
        if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() == "gaussian")
                or (init == "orthogonal" and E == 1)):
            raise ValueError(f"init_lora_weights={init!r} needs a base weight matrix; target_parameters "
                             f"({self.parameter_name!r}) supports True, False and 'gaussian' ('orthogonal' on 2-D "
                             "parameters).")
        self.r[name], self.lora_alpha[name], self.lora_bias[name] = r, lora_alpha, False
        self.lora_dropout[name] = nn.Identity()
        self.lora_A[name] = nn.Linear(self.in_features, r * E, bias=False)
        self.lora_B[name] = nn.Linear(r * E, self.out_features, bias=False)
        self.scaling[name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        lora_init.initialise(self, name, config.init_lora_weights)
        view = self.base_view
        for mod in (self.lora_A, self.lora_B):  # PEFT: the parameter's device and dtype, then float32 if 16-bit
            mod[name] = mod[name].to(view.device, dtype=view.dtype if view.dtype.is_floating_point else None)
            if autocast_adapter_dtype and mod[name].weight.dtype in (torch.float16, torch.bfloat16):
                mod[name] = mod[name].to(torch.float32)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @classmethod
    def expected_state(cls, target, config) -> dict[str, tuple[int, ...]]:
        r = target.kwargs["r"]
        E = ParamView(target.module, target.kwargs["parameter_name"]).num_experts
        return {"lora_A.weight": (r * E, target.in_features), "lora_B.weight": (target.out_features, r * E)}

    # --- the math ------------------------------------------------------------------------------------------------
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, r, in], B [E, out, r]) of adapter `name`: views of PEFT's two matrices."""
        return expert_factors(self, name)

    def kernel_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`factors`, with B in the experts-outermost layout the grouped kernels read. PEFT's layout strides the
        experts innermost, so B is copied: on every call while B is trainable (under FSDP2 an optimizer step can
        change it in the same parameter, storage address and version, which no key could tell), once per change
        of a frozen B (adapters loaded for inference)."""
        a3, b3 = self.factors(name)
        b = self.lora_B[name].weight
        if b.requires_grad:
            return a3, b3.contiguous()
        key = (id(b), b._version, b.data_ptr(), b.dtype)
        cached = self._b_cache.get(name)
        if cached is None or cached[0] != key:
            cached = self._b_cache[name] = (key, b3.detach().contiguous(), b)
        return a3, cached[1]

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the parameter's layout: [E, out, in] ([E, in, out] for transposed experts), [out, in] in 2-D."""
        a3, b3 = self.factors(name)
        delta = torch.bmm(b3, a3) * self.scaling[name]  # [E, out, in]
        view = self.base_view
        if getattr(view.experts, "is_transposed", False):
            delta = delta.transpose(1, 2)
        return delta[0] if view.ndim == 2 else delta

    def merge_weight(self, name: str, weight: torch.Tensor, ctx: Any, live: bool = False) -> torch.Tensor:
        return self.base_view.merge_add(weight, self.get_delta_weight(name), live)

    def unmerge_weight(self, name: str, weight: torch.Tensor, live: bool = False) -> torch.Tensor:
        return self.base_view.merge_sub(weight, self.get_delta_weight(name), live)

    def delta_fn(self, active: list[str]):
        """The grouped LoRA delta of this parameter's active adapters over rows sorted by expert."""
        return grouped_delta_fn(self, active, self.kernel_factors)

    def mixed_delta_fn(self, batch):
        """A mixed batch (beyond PEFT, which refuses it here): each row takes its sample's adapter for its expert.
        The (adapter, expert) pairs are the slots of the multi-adapter kernels, so one shrink and one expand serve
        every adapter and expert of the batch."""
        def delta(x: torch.Tensor, routing: Routing) -> torch.Tensor:
            E, names = self.num_experts, batch.slot_names
            sample, meta = _mixed_rows(routing, batch, E)  # shared by both projections of the forward
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
                # Gradients wanted: each adapter's grouped op on its own rows, differentiable (the batched kernels
                # are inference launchers).
                out = x.new_zeros(x.shape[0], self.out_features)
                for i, n in enumerate(names):
                    if n in self.lora_A:
                        a3, b3 = self.factors(n)
                        d = grouped_lora(x, a3, b3, self.scaling[n], routing.meta, rows_sorted=True)
                        out = out.to(d.dtype) + d * (sample == i).unsqueeze(-1).to(d.dtype)
                return out
            a_stack, b_stack, ranks, scalings = self._mixed_stacks(names, x.device)
            y = torch.zeros(x.shape[0], self.out_features, dtype=a_stack.dtype, device=x.device)
            return multi_lora(x, y, a_stack, b_stack, ranks, scalings, meta, inplace=True)
        return delta

    def _mixed_stacks(self, names: tuple[str, ...], device: torch.device):
        """[adapters·E, r_max, in] and [adapters·E, out, r_max] stacks, ranks and scalings (rank 0: an adapter this
        parameter does not have), kept until an adapter changes (its parameters' versions or storage, the set, the
        scalings) or an event of the layer drops them."""
        here = [n for n in names if n in self.lora_A]
        key = (names, device, tuple((p._version, p.data_ptr()) for n in here
                                    for p in (self.lora_A[n].weight, self.lora_B[n].weight)),
               tuple(float(self.scaling[n]) for n in here))
        cached = getattr(self, "_mixed_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        stacks = self._build_mixed_stacks(names, device)
        self._mixed_cache = (key, stacks)
        return stacks

    def _clear_caches(self) -> None:
        self._mixed_cache = None
        self._b_cache = {}

    def _build_mixed_stacks(self, names: tuple[str, ...], device: torch.device):
        E = self.num_experts
        here = [n for n in names if n in self.lora_A]
        r_max = max([self.r[n] for n in here], default=1)
        dtype = self.lora_A[here[0]].weight.dtype if here else torch.float32
        a = torch.zeros(len(names) * E, r_max, self.in_features, device=device, dtype=dtype)
        b = torch.zeros(len(names) * E, self.out_features, r_max, device=device, dtype=dtype)
        ranks = torch.zeros(len(names) * E, dtype=torch.int32, device=device)
        scalings = torch.zeros(len(names) * E, dtype=torch.float32, device=device)
        for i, n in enumerate(names):
            if n not in self.lora_A:
                continue
            a3, b3 = self.factors(n)
            r, rows = self.r[n], slice(i * E, (i + 1) * E)
            a[rows, :r], b[rows, :, :r] = a3.detach(), b3.detach()
            ranks[rows], scalings[rows] = r, self.scaling[n]
        return a, b, ranks, scalings

    def hotswap_refusal(self) -> str:
        return "a target_parameters wrapper"

    def __repr__(self) -> str:
        # PEFT's name for this layer type (get_layer_status reports it).
        return "lora.ParamWrapper" + super().__repr__()[len(type(self).__name__):]

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = kwargs.pop("adapter_names", None)
        if names is not None and not isinstance(names, AdapterNames):  # a direct call with a plain list
            names = AdapterNames(list(names), tuple(sorted(set(names) - {BASE_NAME})), device=hidden_states.device)
        batch = names if names is not None else batch_for(self)
        chain, module = {}, self
        while isinstance(module, LoraParam):
            if module.disable_adapters and module.merged:  # as every layer: disabling undoes a merge first
                module.unmerge()
            if batch is not None:
                if module.merged:
                    raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                                     "`unmerge_adapter` first.")
                if not module.disable_adapters:
                    chain[module.parameter_name] = module.mixed_delta_fn(batch)
            else:
                active = [a for a in module.active_adapters if a in module.lora_A]
                if active and not module.merged and not module.disable_adapters:
                    chain[module.parameter_name] = module.delta_fn(active)
            module = module.base_layer
        if batch is not None and chain and not is_experts_module(module):
            raise ValueError("lora.ParamWrapper does not support mixed adapter batches (adapter_names) on "
                             f"{type(module).__name__}; peft_fast serves them on transformers experts modules only.")
        if not chain:
            return module(hidden_states, *args, **kwargs)
        if is_experts_module(module):
            return experts_forward(module, chain, hidden_states, *args, **kwargs)
        # Any other module: PEFT's way, its forward with W + ΔW in place of each adapted parameter.
        weights = {}
        wrapper = self
        while isinstance(wrapper, LoraParam):
            if wrapper.parameter_name in chain:
                param = getattr(module, wrapper.parameter_name)
                delta = sum(wrapper.get_delta_weight(n) for n in wrapper.active_adapters if n in wrapper.lora_A)
                weights[wrapper.parameter_name] = param + delta.to(param.dtype)
            wrapper = wrapper.base_layer
        return torch.func.functional_call(module, weights, (hidden_states, *args), kwargs, strict=False)
