"""DoRA (weight-decomposed LoRA) for LoraLinear: y = (m / ||W + s·B·A||_row) ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b.

PEFT (`lora.dora.DoraLinearLayer`) builds B·A and W + s·B·A, [out, in] each, on every forward call. Here the row
norm comes from `kernels.dora_norm` (||W||², W·Aᵀ and A·Aᵀ; never an [out, in] matrix), ||W||² is computed once per
layer (the base is frozen), and outside training the whole scale m / norm is cached per adapter.

Forward, with c = m / norm (norm detached, as in the paper §4.3 and PEFT), on the CPU reference path in PEFT's order
of operations (float32: PEFT's outputs to ~1e-6; 16-bit bases: within 16-bit rounding, since the norm comes from
the float32 expansion and PEFT's from the dense W + s·B·A; rounding t = x·Wᵀ + s·lora(x) to bf16 before scaling,
as a naive `c ⊙ lora_linear(x) + b` would, moved a tiny bf16 Llama's logits by ~1%):
- no dropout (or eval): `result + (c - 1)·(result - b) + c·s·lora(x)` with result = x·Wᵀ + b, the base output
  already computed: no second base matmul, and no dense B·A.
- dropout in training: PEFT recomputes the base on the dropped-out input, `(c - 1)·(drop(x)·Wᵀ)`; that term is
  exact only with drop(x)·Wᵀ itself, so it is the one extra matmul, taken only then.
- on Triton (CUDA): `kernels.dora_linear`, c ⊙ (x·Wᵀ + s·lora(x)) + b with c and b applied in the LoRA expand's
  epilogue and the magnitude's gradient recovered from y: LoRA's launches and activations. With dropout,
  result - v + dora_linear(v, drop(x)), v = drop(x)·Wᵀ in the base dtype.

Caches (never in the state dict): `_dora_wsq` (||W||², keyed on the base weight's identity, storage and version),
`_dora_cache[name]` (norm and scale, keyed on A, B, m and the base, used only while the layer is not training).
Merging and unmerging, which rewrite the base through `.data`, clear them explicitly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quantized
from .nf4_linear import NF4Linear
from .kernels import dora_linear, dora_norm, dora_norm_nf4, lora_linear, nf4_linear, use_triton


class DoraLinearLayer(nn.Module):
    """PEFT's module of the same name: holds the magnitude as `.weight` (`lora_magnitude_vector.<name>.weight`)."""

    def __init__(self, magnitude: torch.Tensor, fan_in_fan_out: bool):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


def check_base(layer) -> None:
    base = layer.base_layer
    if quantized.is_4bit_base(base):
        return
    w = getattr(base, "weight", None)
    if w is None or not w.dtype.is_floating_point or w.dim() != 2:
        raise NotImplementedError(f"DoRA (use_dora=True) over a {type(base).__name__} base layer is not supported "
                                  "in peft_fast: it needs a floating-point 2-D weight or a 4-bit one (bitsandbytes "
                                  "Linear4bit or peft_fast's NF4Linear).")


# --- the base weight ---------------------------------------------------------------------------------------------
def _nf4(layer):
    """(packed, state) of a 4-bit base, or None when its weight is not quantized in a form we read."""
    if isinstance(layer.base_layer, NF4Linear):
        return layer.base_layer.weight, layer.base_layer.quant_state
    qs = getattr(layer.base_layer.weight, "quant_state", None)
    if qs is None or getattr(qs, "packing_format_for_cpu", False) or len(qs.shape) != 2:
        return None
    return quantized._converted(layer)


def _dense_weight(layer) -> torch.Tensor:
    """The base weight oriented [out, in] (a view for fan_in_fan_out), or dequantized for a 4-bit base bnb repacked."""
    base = layer.base_layer
    if quantized.is_4bit_base(base):
        from .merging import dequantize_4bit
        return dequantize_4bit(base)
    w = base.weight.detach()
    return w.T if layer.fan_in_fan_out else w


def _quant_state(layer):
    qs = getattr(layer.base_layer.weight, "quant_state", None)  # bnb's Params4bit
    return qs if qs is not None else getattr(layer.base_layer, "quant_state", None)  # NF4Linear


def _base_key(layer) -> tuple:
    w = layer.base_layer.weight
    qs = _quant_state(layer)
    extra = quantized._cache_key(w, qs) if qs is not None else ()
    return (id(w), w.data_ptr(), w._version, w.dtype, w.device, layer.fan_in_fan_out, id(qs), extra)


def _norm(layer, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """||W + s·B·A|| per row (float32, or float64 for float64 tensors), ||W||² taken from the layer's cache."""
    key = _base_key(layer)
    cached = layer.__dict__.get("_dora_wsq")
    sq = cached[1] if cached is not None and cached[0] == key else None
    q = _nf4(layer) if quantized.is_4bit_base(layer.base_layer) else None
    if q is not None:
        norm, sq_new = dora_norm_nf4(q[0], q[1], a, b, s, sq)
    else:
        norm, sq_new = dora_norm(_dense_weight(layer), a, b, s, sq)
    if sq is None:
        layer.__dict__["_dora_wsq"] = (key, sq_new)
    return norm


def init_magnitude(layer, name: str) -> None:
    """PEFT's init: m = ||W + s·B·A|| per row, in the dtype PEFT's sum promotes to (base dtype with the adapters')."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    s = float(layer.scaling[name])
    norm = _norm(layer, a, b, s)
    wdtype = layer.base_layer.weight.dtype
    if quantized.is_4bit_base(layer.base_layer):
        wdtype = _dense_dtype(layer)
    ldtype = torch.float16 if a.dtype == torch.float16 else b.dtype
    dtype = torch.promote_types(wdtype, ldtype) if wdtype.is_floating_point else ldtype
    if not layer.__dict__.get("_dora_any"):
        layer.adapter_layer_names = tuple(layer.adapter_layer_names) + ("lora_magnitude_vector",)
        layer.__dict__["_dora_any"] = True
    layer.lora_magnitude_vector[name] = DoraLinearLayer(norm.to(device=a.device, dtype=dtype),
                                                        layer.fan_in_fan_out)
    clear(layer, name)


def _dense_dtype(layer) -> torch.dtype:
    qs = _quant_state(layer)
    return qs.dtype if qs is not None else torch.float32


def clear(layer, name: Optional[str] = None, base: bool = False) -> None:
    cache = layer.__dict__.setdefault("_dora_cache", {})
    if name is None:
        cache.clear()
    else:
        cache.pop(name, None)
    if base:
        layer.__dict__.pop("_dora_wsq", None)
    layer.__dict__.pop("_stack_cache", None)


# --- the scale c = m / norm --------------------------------------------------------------------------------------
def _adapter_key(layer, a, b, m, s) -> tuple:
    # Cheap on purpose (it runs on every eval forward): storages and version counters of everything the scale
    # depends on. A dtype or device move swaps storages, so it shows here too.
    w = layer.base_layer.weight
    qs = _quant_state(layer)
    extra = quantized._cache_key(w, qs) if qs is not None else ()  # absmax swapped inside the same quant state
    return (a.data_ptr(), a._version, b.data_ptr(), b._version, m.data_ptr(), m._version, w.data_ptr(), w._version,
            id(w), id(qs), extra, float(s), layer.fan_in_fan_out)


def _cached(layer, name: str, a, b, s) -> tuple:
    """(key, norm, c, c - 1) for the eval cache, rebuilt when the key changed."""
    m = layer.lora_magnitude_vector[name].weight
    cache = layer.__dict__.setdefault("_dora_cache", {})
    key = _adapter_key(layer, a, b, m, s)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        norm = _norm(layer, a, b, s).to(m.dtype)
        c = m.detach() / norm
        hit = (key, norm, c, c - 1)
        cache[name] = hit
    return hit


def scale(layer, name: str, grad: Optional[bool] = None, args: Optional[tuple] = None) -> torch.Tensor:
    """c = m / ||W + s·B·A|| [out] in the magnitude's dtype; differentiable in m when m needs a gradient.
    `args`: the layer's `_adapter_args(name)` when the caller has them already."""
    a, b, s, _, _ = args if args is not None else layer._adapter_args(name)
    m = layer.lora_magnitude_vector[name].weight
    if grad is None:
        grad = torch.is_grad_enabled() and m.requires_grad
    if layer.training:
        norm = _norm(layer, a, b, s).to(m.dtype)
        return m / norm if grad else (m.detach() / norm)
    hit = _cached(layer, name, a, b, s)
    return m / hit[1] if grad else hit[2]


# --- forward -------------------------------------------------------------------------------------------------------
def fused_forward(layer, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    """One DoRA adapter over a plain dense or fusable NF4 base (our base matmul, not the module's); None when the
    base cannot be fused. The DoRA terms then follow PEFT's order exactly (see `delta`)."""
    plain = layer._plain_base()
    q = None if plain is not None else quantized.fused_base(layer, x)
    if plain is None and (q is None or q[3] is not None):
        return None  # not fusable, or a 4-bit base computing in another dtype than x's: PEFT's loop, base_layer(x)
    args = layer._adapter_args(name)
    a, b, s, p, _ = args
    on_triton = use_triton(x, plain[0] if plain is not None else q[0], a, b)
    if (plain is not None and not (layer.training or torch.is_grad_enabled()) and not isinstance(s, torch.Tensor)
            and not on_triton):
        # Eval on the reference path (decode): PEFT's steps, with as few Python and torch calls as possible
        result = F.linear(x, plain[0], plain[1])
        d = _delta_eval(layer, name, x.to(a.dtype), result, a, b, s)
        return result.add_(d) if result.dtype == torch.promote_types(result.dtype, d.dtype) else \
            (result + d).to(result.dtype)
    if on_triton:
        # Triton: the base matmul without bias, then one expand whose epilogue applies c and b (dora_linear.py)
        c = scale(layer, name, args=args).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        bias = plain[1] if plain is not None else q[2]
        if p == 0:
            if plain is not None:  # the base matmul inside the op, its output buffer reused for y
                return dora_linear(None, x, bias, a, b, s, c, weight=plain[0])
            return dora_linear(_base_matmul(plain, q, x, a, b), x, bias, a, b, s, c)
        # Dropout: y = result + (c - 1)·v + c·s·lora(xd), v = xd·Wᵀ, = result - v + dora_linear(v, xd). The dropped
        # x stays in x's dtype and v runs in the base dtype (PEFT upcasts W to float32 for it: an [out, in] copy).
        result = _base_matmul(plain, q, x, a, b, bias)
        xd = layer.lora_dropout[name](x)
        v = _base_matmul(plain, q, xd, a, b)
        return (result - v) + dora_linear(v, xd, None, a, b, s, c)
    if plain is not None:
        result = F.linear(x, plain[0], plain[1])
    else:  # the NF4 matmul alone
        result = nf4_linear(x, q[0], q[1], q[2])
    return loop_forward(layer, x, result, [name])


def _base_matmul(plain, q, x: torch.Tensor, a, b, bias=None) -> torch.Tensor:
    if plain is not None:
        return F.linear(x, plain[0], bias)
    return nf4_linear(x, q[0], q[1], bias)  # the NF4 matmul alone


def _base_nobias(layer, xd: torch.Tensor, a, b) -> torch.Tensor:
    """drop(x)·Wᵀ for PEFT's dropout path (W in xd's dtype, as PEFT casts it)."""
    base = layer.base_layer
    if quantized.is_4bit_base(base):
        q = _nf4(layer)
        # On Triton (or a float32 state, where the roundings agree): the NF4 matmul alone (nf4_linear). It
        # dequantizes in float32 where PEFT first rounds to the state's dtype: within that dtype's rounding.
        # Otherwise PEFT's dense dequantized weight.
        if q is not None and q[1].shape[1] % q[1].blocksize == 0 and (
                q[1].dtype == torch.float32 or use_triton(xd, q[0])):
            return nf4_linear(xd, q[0], q[1], None)
        return F.linear(xd, _dense_weight(layer).to(xd.dtype))
    w = base.weight.T if layer.fan_in_fan_out else base.weight
    return F.linear(xd, w.to(xd.dtype))


def _delta_eval(layer, name: str, x: torch.Tensor, result: torch.Tensor, a, b, s) -> torch.Tensor:
    """`delta` without autograd and outside training: the cached c and c - 1, in-place steps (decode is
    dominated by per-op overhead): (c·lora)·s as PEFT, then + (c - 1)·(result - b)."""
    _, _, c, cm1 = _cached(layer, name, a, b, s)
    lora = F.linear(F.linear(x, a), b)
    lora.mul_(c).mul_(s)
    bias = getattr(layer.base_layer, "bias", None)
    return lora.addcmul_(result - bias if bias is not None else result, cm1)


def delta(layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """PEFT's `DoraLinearLayer.forward`: what adapter `name` adds to `result` (x already in the adapter dtype)."""
    args = layer._adapter_args(name)
    a, b, s, p, _ = args
    if not (layer.training or torch.is_grad_enabled()) and not isinstance(s, torch.Tensor):
        return _delta_eval(layer, name, x, result, a, b, s)
    c = scale(layer, name, args=args)
    if p > 0:
        xd = layer.lora_dropout[name](x)  # the module, so the RNG is drawn as PEFT draws it
        base_result = _base_nobias(layer, xd, a, b)
    else:
        xd, bias = x, layer.base_layer.bias if hasattr(layer.base_layer, "bias") else None
        base_result = result - bias if bias is not None else result
    lora = lora_linear(xd, None, None, a, b, s, 0.0)
    return (c - 1) * base_result + c * lora


def loop_forward(layer, x: torch.Tensor, result: torch.Tensor, active: list[str]) -> torch.Tensor:
    """PEFT's adapter loop with DoRA adapters among the active ones (dense `lora.Linear` or bnb `Linear4bit` order)."""
    q4 = quantized.is_4bit_base(layer.base_layer)
    out_dtype = result.dtype
    for name in active:
        a, b, s, p, b_bias = layer._adapter_args(name)
        x = x.to(a.dtype)
        if layer.use_dora.get(name):
            result = result + delta(layer, name, x, result)
        else:
            d = lora_linear(x, None, None, a, b, s, p, b_bias)
            result = result + (d.to(out_dtype) if q4 else d)
        if q4:
            result = result.to(out_dtype)
    return result.to(out_dtype)


def mixed_rows(layer, name: str, x: torch.Tensor, result: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """One DoRA adapter on a sub-batch, differentiable: PEFT's variant forward on result[rows]."""
    sub = x[rows]
    a = layer._adapter_args(name)[0]
    sub = sub.to(a.dtype)
    res = result[rows]
    return (res + delta(layer, name, sub, res)).to(result.dtype)


# --- merging (PEFT's DoraLinearVariant.merge_safe / merge_unsafe / unmerge) ---------------------------------------
def _orient(layer, v: torch.Tensor) -> torch.Tensor:
    """A per-output-row factor [out] shaped to scale the stored base weight ([out, in], or [in, out] for Conv1D)."""
    return v.view(1, -1) if layer.fan_in_fan_out else v.view(-1, 1)


def merge_norm(layer, name: str, unmerged: torch.Tensor) -> torch.Tensor:
    """||W0 + ΔW|| per row over the unmerged base W0 (stored layout), in W0's dtype as PEFT's get_weight_norm."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    w0 = unmerged.T if layer.fan_in_fan_out else unmerged
    norm, _ = dora_norm(w0, a, b, float(layer.scaling[name]))
    dtype = torch.promote_types(unmerged.dtype, layer.get_delta_weight(name).dtype)
    return norm.to(dtype)


def merged_weight(layer, name: str, weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    factor = layer.lora_magnitude_vector[name].weight.detach() / norm
    return (_orient(layer, factor) * (weight + layer.get_delta_weight(name).detach())).to(weight.dtype)


def unmerged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    norm = layer.__dict__.setdefault("_dora_merged_norm", {})[name]
    factor = layer.lora_magnitude_vector[name].weight.detach() / norm
    return (weight / _orient(layer, factor) - layer.get_delta_weight(name).detach()).to(weight.dtype)
