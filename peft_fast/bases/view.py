"""Base-weight views: one small interface over the base layers an adapter can sit on, so that tuner math never
checks base types itself.

A view wraps the base module (it holds no tensors of its own besides caches of what it derives, each kept with
the objects it was derived from) and answers:
- shape and orientation: in_features, out_features, fan_in_fan_out;
- fused kernels: `fused_dense()` (W [out, in], bias) when a plain dense matmul may replace the module's forward,
  `fused_nf4(x)` (packed, state, bias, cast) when the NF4 op may, `nf4()` (packed, state) for norms;
- merges and norms: `dense_weight()` [out, in], `read_weight()` / `write_weight()` in the stored layout
  (dequantized / re-quantized for 4-bit bases), `dense_dtype`;
- `version()`: a cheap key of the weight's values (object identity, storage address, version counter, device,
  dtype; the quant state's objects for 4-bit bases), for caches of values derived from the weight, which keep
  `key_objects()` alive with them so that no identity in a key can be reused by a new object meanwhile.
`view_of(module)` (bases/__init__.py) picks the view by a dispatcher list.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch.nn.modules import module as _nn_module
from transformers.pytorch_utils import Conv1D

from ..kernels import use_triton
from ..kernels.common.nf4_format import check_nf4_args


def _hooked(module: nn.Module) -> bool:
    """Hooks on `module` itself (forward, pre-forward, backward) or a forward replaced on the instance. Read straight
    from the instance's dict: layers check their modules at every call."""
    d = module.__dict__
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
                or "forward" in d)


def has_hooks(module: nn.Module) -> bool:
    """Whether `module` must be called as a module rather than replaced by a fused op reading its weights: hooks on
    it (forward, pre-forward, backward: accelerate's offload, DeepSpeed ZeRO-3, Opacus, activation capture), hooks
    on every module (torch's global ones), or a forward replaced on the instance (accelerate's add_hook_to_module)."""
    return _hooked(module) or global_hooks()


# torch's hooks on every module (nn.modules.module.register_module_forward_hook, ...): dicts torch mutates in place
_GLOBAL_FORWARD, _GLOBAL_FORWARD_PRE = _nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks
_GLOBAL_BACKWARD, _GLOBAL_BACKWARD_PRE = _nn_module._global_backward_hooks, _nn_module._global_backward_pre_hooks


def global_hooks() -> bool:
    return bool(_GLOBAL_FORWARD or _GLOBAL_FORWARD_PRE or _GLOBAL_BACKWARD or _GLOBAL_BACKWARD_PRE)


def must_call(module: nn.Module) -> bool:
    """`has_hooks` without the global ones (the caller checks those once), or parametrized weights
    (torch.nn.utils.parametrize: weight_norm, spectral_norm, ...), which exist only while the module computes them:
    an adapter's factor then runs as PEFT runs it, as a module."""
    return _hooked(module) or "parametrizations" in module.__dict__["_modules"]


def _accelerate_hooks(module: nn.Module) -> list:
    """accelerate's hooks on `module` (a SequentialHook holds several)."""
    hook = module.__dict__.get("_hf_hook")  # (an instance attribute: no nn.Module lookup, checked per call)
    return [] if hook is None else list(getattr(hook, "hooks", None) or [hook])


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloaded `module`'s weights (cpu_offload, a device_map with "cpu" or "disk"): they sit on
    the meta device between forwards and come in through its hook. (A model built on meta is not offloaded.)"""
    return any(getattr(h, "offload", False) for h in _accelerate_hooks(module))


def _offload_hook(module: nn.Module):
    return next((h for h in _accelerate_hooks(module) if getattr(h, "offload", False)), None)


@contextmanager
def onloaded(layer: nn.Module, write_back: bool = False, base_only: bool = False) -> Iterator[None]:
    """An adapter layer's weights that accelerate offloaded (its base's, and unless `base_only` its adapters'
    modules'), on their execution device for the block, as PEFT's `onload_layer` brings them in for a merge. With
    `write_back`, the base's tensors then replace its offloaded copy (in host memory, also for a layer offloaded to
    disk), so that a merge outlives the block; not when the block raises. Nothing happens where nothing is
    offloaded. Callers drop what they cached from the onloaded tensors (the base view's caches are dropped here)."""
    modules = [layer.base_layer] if base_only else layer.modules()
    hooked = [(m, h) for m in modules if (h := _offload_hook(m)) is not None]
    if not hooked:
        yield
        return
    from accelerate.utils import named_module_tensors

    for m, h in hooked:
        h.pre_forward(m)
    try:
        yield
        base = layer.base_layer
        hook = _offload_hook(base)
        if write_back and hook is not None:
            hook.weights_map = {name: t.detach().to("cpu") for name, t in named_module_tensors(base)}
    finally:
        for m, h in hooked:
            h.post_forward(m, torch.tensor([]))
        view = getattr(layer, "base_view", None)
        if view is not None:  # values cached from the onloaded weight would keep it on the device
            view.clear()


class BaseView:
    quantized = False  # a 4-bit base: the fused 4-bit paths, and merges that dequantize and re-quantize
    requantizes = property(lambda self: self.quantized)  # merges dequantize and re-quantize (4-bit, 8-bit bases)
    # PEFT's bitsandbytes layers' order in the adapter loop: each delta cast to the output's dtype, then added
    bnb_order = property(lambda self: self.quantized)
    fan_in_fan_out = False

    def __init__(self, module: nn.Module):
        self.module = module
        self.norm_sq = None  # (version(), ||W||² per output row): DoRA's norms reuse it while the base is unchanged

    def clear(self) -> None:
        """Forget values derived from the weight (events that may change it without a version bump)."""
        self.norm_sq = None

    def cached_norm_sq(self):
        c = self.norm_sq
        return c[1] if c is not None and c[0] == self.version() else None

    def store_norm_sq(self, sq: torch.Tensor) -> None:
        self.norm_sq = (self.version(), sq, self.key_objects())

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.module, "bias", None)

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def device(self) -> torch.device:
        """Where the base computes, so where its adapters live. A weight accelerate offloaded (device_map "cpu" or
        "disk") is on meta between forwards and comes in to its hook's execution device for each: the adapters,
        small, stay there instead (PEFT offloads them too)."""
        device = self.weight.device
        if device.type == "meta":
            for hook in _accelerate_hooks(self.module):
                if getattr(hook, "execution_device", None) is not None:
                    return torch.device(hook.execution_device)
        return device

    @property
    def adapter_dtype(self) -> Optional[torch.dtype]:
        """The dtype adapters are first created in (PEFT moves them to the base's dtype, then upcasts 16-bit); None
        for packed 4-bit weights: the adapters keep their own dtype."""
        dtype = self.weight.dtype
        return dtype if dtype.is_floating_point else None

    @property
    def init_dtype(self) -> Optional[torch.dtype]:
        """The dtype PEFT's layers move a new adapter's tensors to before autocast upcasts 16-bit ones to float32:
        the floating base weight's, a 4-bit layer's compute dtype, or None (the tensors keep theirs)."""
        return self.adapter_dtype

    @property
    def dense_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def fused_dense(self):
        return None

    def fused_nf4(self, x: torch.Tensor):
        return None

    def nf4(self):
        return None

    def supports_norms(self) -> bool:
        """Whether `dense_weight` is a floating [out, in] matrix (what DoRA's norm needs)."""
        w = self.weight
        return w.dtype.is_floating_point and w.dim() == 2

    def oriented(self) -> torch.Tensor:
        """The weight as [out, in] (a view of the parameter for fan_in_fan_out bases), in the autograd graph."""
        w = self.weight
        return w.T if self.fan_in_fan_out else w

    def dense_weight(self) -> torch.Tensor:
        """[out, in] values for norms and merges: the detached weight, or the dequantized one for 4-bit bases."""
        return self.oriented().detach()

    def read_weight(self) -> torch.Tensor:
        """The weight in its stored layout, as merges start from it (the live tensor for dense bases)."""
        return self.weight.data

    def write_weight(self, weight: torch.Tensor) -> None:
        self.weight.data = weight

    def merge_add(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        """weight + delta as a merge writes it, in place in the base dtype as PEFT's dense layers do (`live`: into
        the parameter's own tensor, as PEFT's unsafe merge; else into a copy, rounding the delta first)."""
        if live:
            weight += delta
        else:
            weight += delta.to(weight.dtype)
        return weight

    def merge_sub(self, weight: torch.Tensor, delta: torch.Tensor, live: bool = False) -> torch.Tensor:
        weight -= delta.to(weight.dtype)
        return weight

    def mergeable(self) -> bool:
        w = self.weight
        return w.dtype.is_floating_point and type(w).__name__ not in ("Params4bit", "Int8Params")

    def version(self) -> tuple:
        # The storage address too: `weight.data = ...` swaps storage under the same version counter.
        w = self.weight
        return (id(w), w.data_ptr(), w._version, w.device, w.dtype)

    def key_objects(self) -> tuple:
        return (self.weight,)

    def check(self, name: str) -> None:
        """Raise, naming the layer, when the base cannot carry an adapter as it is (4-bit states that do not fit)."""


class DenseView(BaseView):
    """nn.Linear (and subclasses), transformers' Conv1D ([in, out] storage: fan_in_fan_out)."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.fan_in_fan_out = isinstance(module, Conv1D)
        self._plain = type(module) is nn.Linear or type(module) is Conv1D

    @property
    def in_features(self) -> int:
        if hasattr(self.module, "in_features"):
            return self.module.in_features
        return self.module.weight.shape[0 if self.fan_in_fan_out else 1]

    @property
    def out_features(self) -> int:
        if hasattr(self.module, "out_features"):
            return self.module.out_features
        return self.module.weight.shape[1 if self.fan_in_fan_out else 0]

    def fused_dense(self):
        """(weight [out, in], bias) when the module is a plain Linear/Conv1D without hooks; else None."""
        if not self._plain or has_hooks(self.module):
            return None
        w = self.module.weight
        return (w.T if self.fan_in_fan_out else w), self.module.bias

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, Conv1D))


def compute_cast(compute_dtype, x: torch.Tensor):
    """None: x runs as it is. A 16-bit dtype: the fused op runs in it and its output is cast back to x's dtype.
    False: the fused op cannot reproduce the base layer here (the caller runs the module).

    QLoRA's usual recipe (prepare_model_for_kbit_training upcasts the norms) feeds float32 activations to layers
    that compute in bf16. bitsandbytes casts x for the base matmul and PEFT runs the LoRA delta in float32 beside
    it. On the Triton path the whole op runs in the compute dtype instead, LoRA included (float32 accumulation;
    the delta is rounded once to the 16-bit output, within its tolerance): one fused op rather than bnb's layer
    plus float32 LoRA matmuls without tensor cores. The CPU reference keeps PEFT's order exactly (returns False)."""
    if compute_dtype is None or compute_dtype == x.dtype:
        return None
    if compute_dtype in (torch.float16, torch.bfloat16) and x.dtype == torch.float32 and use_triton(x):
        return compute_dtype
    return False


def dense_linear(weight: torch.Tensor, bias, dtype: torch.dtype, training: bool) -> nn.Linear:
    """A frozen nn.Linear in `dtype` holding `weight` and `bias` (a 4-bit base, merged without re-quantizing)."""
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(False)
    linear.train(training)
    return linear


def check_quant_state(module: nn.Module, name: str, packed, state) -> None:
    want = (module.out_features, module.in_features)
    problem = None
    if tuple(state.shape) != want:
        problem = f"its quant_state describes a weight of shape {tuple(state.shape)}, the layer is {want} (out, in)"
    else:
        try:
            check_nf4_args(packed, state)
        except ValueError as e:
            problem = str(e).removeprefix("nf4_dequantize: ")
    if problem:
        raise ValueError(f"Target module {name} ({type(module).__name__}): mismatched 4-bit quant_state: {problem}. "
                         "The weight and its quant state must come from the same quantization; reload the "
                         "checkpoint, or exclude this module.")
