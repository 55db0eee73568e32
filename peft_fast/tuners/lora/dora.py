"""DoRA (weight-decomposed LoRA), a variant of the LoRA layer: y = (m / ||W + s·B·A||_row) ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b.

PEFT (`lora.dora.DoraLinearLayer`) builds B·A and W + s·B·A, [out, in] each, on every forward call. Here the row
norm comes from `kernels.dora_norm` (||W||², W·Aᵀ and A·Aᵀ; never an [out, in] matrix), ||W||² is computed once per
base weight (kept by the base view), and outside training the whole scale m / norm is cached per adapter.

Forward, with c = m / norm (norm detached, as in the paper §4.3 and PEFT), on the CPU reference path in PEFT's order
of operations (float32: PEFT's outputs to ~1e-6; 16-bit bases: within 16-bit rounding, since the norm comes from
the float32 expansion and PEFT's from the dense W + s·B·A; rounding t = x·Wᵀ + s·lora(x) to bf16 before scaling,
as a naive `c ⊙ lora_linear(x) + b` would, moved a tiny bf16 Llama's logits by ~1%):
- no dropout (or eval): `result + (c - 1)·(result - b) + c·s·lora(x)` with result = x·Wᵀ + b, the base output
  already computed: no second base matmul, and no dense B·A.
- dropout in training: PEFT recomputes the base on the dropped-out input, `(c - 1)·(drop(x)·Wᵀ)`; that term is
  exact only with drop(x)·Wᵀ itself, so it is the one extra matmul, taken only then.
- on Triton (CUDA): `kernels.dora_linear`, c ⊙ (x·Wᵀ + s·lora(x)) + b with c and b applied in the LoRA expand's
  epilogue and the magnitude's gradient recovered from y: LoRA's launches and activations. With dropout over a
  dense base, `kernels.dora_dropout_linear`: the mask regenerated from a seed as LoRA's, so that backward keeps
  only v = drop(x)·Wᵀ beside LoRA's z (the masks are then not PEFT's draws, as with LoRA on Triton); over a 4-bit
  base, result - v + dora_linear(v, drop(x)) with PEFT's dropout module.

Caches (never in the state dict): ||W||² on the base view (keyed on the base weight's identity, storage and version),
and per adapter the eval scale (norm and c, keyed likewise on A, B, m and the base, used only while the layer is not
training and not compiling) and the norm a merge used (unmerging needs it). Merges, unmerges, train()/eval() and
moves clear them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...bases import view_of
from ...bases.view import onloaded
from ...kernels import dora_dropout_linear, dora_linear, dora_norm, dora_norm_nf4, lora_linear, nf4_linear, use_triton
from ...kernels.common.backend import functorch_active, keeps_no_state
from .variants import LoraVariant, nf4_fallback


class DoraLinearLayer(nn.Module):
    """PEFT's module of the same name: holds the magnitude as `.weight` (`lora_magnitude_vector.<name>.weight`)."""

    def __init__(self, magnitude: torch.Tensor, fan_in_fan_out: bool):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def forward(self, x: torch.Tensor, *, lora_A: nn.Module, lora_B: nn.Module, scaling: float, base_layer: nn.Module,
                base_result: Optional[torch.Tensor] = None, adapter_name: str = "default") -> torch.Tensor:
        """PEFT's DoRA step, calling the factors as modules (so that their hooks run, as under DeepSpeed ZeRO-3 or
        accelerate's offload): what the adapter adds to the base output. Run only when a module must be called
        (LoraCompute.calls_modules); the fused ops compute the same without W + s·B·A or the identity pass."""
        eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=lora_A.weight.dtype)
        lora_weight = lora_B(lora_A(eye)).T.to(x.dtype)
        view = view_of(base_layer)
        weight = (view.dense_weight() if view.quantized else view.oriented()).to(x.dtype)
        norm = torch.linalg.norm(weight + scaling * lora_weight.detach(), dim=1).to(weight.dtype).detach()
        scale = (self.weight / norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is None:
            base_result = F.linear(x, weight)
        elif getattr(base_layer, "bias", None) is not None:
            base_result = base_result - base_layer.bias
        return (scale - 1) * base_result + scale * lora_result * scaling

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


def _check_base(layer) -> None:
    if not layer.base_view.supports_norms():
        raise NotImplementedError(f"DoRA (use_dora=True) over a {type(layer.base_layer).__name__} base layer is not "
                                  "supported in peft_fast: it needs a floating-point 2-D weight or a 4-bit one "
                                  "(bitsandbytes Linear4bit or peft_fast's NF4Linear).")


def _norm(layer, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """||W + s·B·A|| per row (float32, or float64 for float64 tensors), ||W||² reused from the base view."""
    view = layer.base_view
    compiling = keeps_no_state()  # traced or transformed code keeps no state: it computes ||W||² in the same pass
    sq = None if compiling else view.cached_norm_sq()
    q = view.nf4() if view.quantized else None
    if q is not None:
        norm, sq_new = dora_norm_nf4(q[0], q[1], a, b, s, sq)
    else:
        norm, sq_new = dora_norm(view.dense_weight(), a, b, s, sq)
    if sq is None and not compiling:
        view.store_norm_sq(sq_new)
    return norm


def _param_key(p: torch.Tensor) -> tuple:
    # The storage is part of the key so that `p.data = ...` (which keeps the version counter) is seen.
    return (id(p), p._version, p.data_ptr())


class DoraVariant(LoraVariant):
    name = "dora"
    scales_channels = True
    # Its output also depends on the magnitude and a norm cached per adapter; swapping it in place (and zeroing the
    # layers the new adapter lacks, which for DoRA would not mean "adds nothing") is not built.
    hotswappable = False

    def __init__(self):
        self._eval = None  # (key, norm, c, c - 1, the tensors of the key, kept alive): see _cached
        self.merged_norm: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self._eval = None

    # --- init ----------------------------------------------------------------------------------------------------
    def check(self, layer, config) -> None:
        if config.lora_bias:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        _check_base(layer)

    def file_tensors(self, out_features: int) -> dict[str, tuple[int, ...]]:
        return {"lora_magnitude_vector": (out_features,)}  # PEFT's file key for the magnitude

    def init(self, layer, name: str) -> None:
        """PEFT's init: m = ||W + s·B·A|| per row, in the dtype PEFT's sum promotes to (base dtype with the
        adapters')."""
        a, b = layer.adapter_args(name)[:2]
        with onloaded(layer, base_only=True):  # a weight accelerate offloaded comes in for the norm
            norm = self.row_norm(layer, a, b, float(layer.scaling[name]))
        view = layer.base_view
        wdtype = view.dense_dtype if view.quantized else layer.base_layer.weight.dtype
        ldtype = torch.float16 if a.dtype == torch.float16 else b.dtype
        dtype = torch.promote_types(wdtype, ldtype) if wdtype.is_floating_point else ldtype
        if "lora_magnitude_vector" not in layer.adapter_layer_names:  # as PEFT, once the layer has a DoRA adapter
            layer.adapter_layer_names = tuple(layer.adapter_layer_names) + ("lora_magnitude_vector",)
        layer.lora_magnitude_vector[name] = DoraLinearLayer(norm.to(device=a.device, dtype=dtype),
                                                            layer.fan_in_fan_out)
        self.clear()

    # --- the scale c = m / norm ----------------------------------------------------------------------------------
    def row_norm(self, layer, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        """||W + s·B·A|| per output channel, shaped as the magnitude (a base of another kind overrides it)."""
        return _norm(layer, a, b, s)

    def orient(self, layer, v: torch.Tensor) -> torch.Tensor:
        """A per-channel factor shaped to scale the stored base weight."""
        return _orient(layer, v)

    def _cached(self, layer, name: str, a, b, s) -> tuple:
        """(key, norm, c, c - 1) for the eval cache, rebuilt when any of A, B, m, the base or s changed."""
        m = layer.lora_magnitude_vector[name].weight
        if keeps_no_state():  # traced or transformed code (torch.func) keeps no state and compares no storage
            # addresses (its tensors have none)
            norm = self.row_norm(layer, a, b, s).to(m.dtype)
            c = m.detach() / norm
            return (None, norm, c, c - 1, None)
        key = (*_param_key(a), *_param_key(b), *_param_key(m), *layer.base_view.version(), float(s))
        hit = self._eval
        if hit is None or hit[0] != key:
            # kept for later calls: never inference tensors (a forward with autograd after torch.inference_mode
            # could not save them for backward); the norm is a constant for autograd anyway, as PEFT detaches it
            with torch.inference_mode(False), torch.no_grad():
                norm = self.row_norm(layer, a, b, s).to(m.dtype)
                c = m.detach() / norm
            hit = self._eval = (key, norm, c, c - 1, (a, b, m, *layer.base_view.key_objects()))
        return hit

    def scale(self, layer, name: str, grad: Optional[bool] = None, args: Optional[tuple] = None) -> torch.Tensor:
        """c = m / ||W + s·B·A|| [out] in the magnitude's dtype; differentiable in m when m needs a gradient.
        `args`: the layer's `adapter_args(name)` when the caller has them already."""
        a, b, s, _, _ = args if args is not None else layer.adapter_args(name)
        m = layer.lora_magnitude_vector[name].weight
        if grad is None:  # (forward-mode AD under torch.func carries m's tangent without requires_grad)
            grad = (torch.is_grad_enabled() and m.requires_grad) or functorch_active()
        if layer.training:
            norm = self.row_norm(layer, a, b, s).to(m.dtype)
            return m / norm if grad else (m.detach() / norm)
        hit = self._cached(layer, name, a, b, s)
        return m / hit[1] if grad else hit[2]

    def mixed_scale(self, layer, name: str) -> torch.Tensor:
        return self.scale(layer, name, grad=False)

    # --- forward ---------------------------------------------------------------------------------------------------
    def fused(self, layer, name: str, x: torch.Tensor):
        """One DoRA adapter over a plain dense or fusable NF4 base (our base matmul, not the module's); None when the
        base cannot be fused. Off Triton the DoRA terms then follow PEFT's order exactly (see `delta`)."""
        view = layer.base_view
        dense = view.fused_dense()
        q = None if dense is not None else view.fused_nf4(x)
        if dense is None and (q is None or q[3] is not None):
            return None  # not fusable, or a 4-bit base computing in another dtype than x's: PEFT's loop
        a, b = layer.adapter_args(name)[:2]
        base = _base_matmul(view, dense is not None)
        if use_triton(x, dense[0] if dense is not None else q[0], a, b):
            run = self._fused_triton(layer, name, view, base, dense is not None)
        elif dense is not None and not (layer.training or torch.is_grad_enabled() or functorch_active()):
            return self._fused_eval(layer, name, view, base)
        else:
            def run(x):
                return layer.loop(x, base(x, view.bias), [name])
        return run if dense is not None else nf4_fallback(layer, view, name, run)

    def _fused_eval(self, layer, name: str, view, base):
        def run(x):  # eval on the reference path (decode): PEFT's steps with the fewest Python/torch calls
            a, b, s, _, _ = layer.adapter_args(name)
            result = base(x, view.bias)
            d = self._delta_eval(layer, name, x.to(a.dtype), result, a, b, s)
            if result.dtype == torch.promote_types(result.dtype, d.dtype):
                return result.add_(d)
            return (result + d).to(result.dtype)

        return run

    def _fused_triton(self, layer, name: str, view, base, dense: bool):
        """The base matmul without bias, then one expand whose epilogue applies c and b (dora_linear.py)."""
        adapter = layer.adapter_reader(name)

        def run(x):
            args = adapter()
            a, b, s, p = args[:4]
            c = self.scale(layer, name, args=args).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
            if p == 0:
                if dense:  # the base matmul inside the op, its output buffer reused for y
                    return dora_linear(None, x, view.bias, a, b, s, c, weight=view.oriented())
                return dora_linear(base(x), x, view.bias, a, b, s, c, overwrite_base=True)
            if dense and p < 1.0:  # (p = 1 drops every input: the path below, over zeros)
                weight = view.oriented()
                if weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
                    # the mask regenerated from a seed: no dropped x, mask or [T, out] output kept for backward
                    return dora_dropout_linear(x, weight, view.bias, a, b, s, c, p)
            # Dropout: y = result + (c - 1)·v + c·s·lora(xd), v = xd·Wᵀ, = result - v + dora_linear(v, xd). The dropped
            # x stays in x's dtype and v runs in the base dtype (PEFT upcasts W for it: an [out, in] copy).
            result = base(x, view.bias)
            xd = layer.lora_dropout[name](x)
            v = base(xd)
            return (result - v) + dora_linear(v, xd, None, a, b, s, c, overwrite_base=True)

        return run

    def _base_nobias(self, layer, xd: torch.Tensor) -> torch.Tensor:
        """drop(x)·Wᵀ for PEFT's dropout path (W in xd's dtype, as PEFT casts it)."""
        view = layer.base_view
        if view.quantized:
            q = view.nf4()
            # On Triton (or a float32 state, where the roundings agree): the NF4 matmul alone (nf4_linear). It
            # dequantizes in float32 where PEFT first rounds to the state's dtype: within that dtype's rounding.
            # Otherwise PEFT's dense dequantized weight.
            if q is not None and q[1].shape[1] % q[1].blocksize == 0 and (
                    q[1].dtype == torch.float32 or use_triton(xd, q[0])):
                return nf4_linear(xd, q[0], q[1], None)
            return F.linear(xd, view.dense_weight().to(xd.dtype))
        return F.linear(xd, view.oriented().to(xd.dtype))

    def _delta_eval(self, layer, name: str, x: torch.Tensor, result: torch.Tensor, a, b, s) -> torch.Tensor:
        """`delta` without autograd and outside training: the cached c and c - 1, in-place steps (decode is
        dominated by per-op overhead): (c·lora)·s as PEFT, then + (c - 1)·(result - b)."""
        _, _, c, cm1, _ = self._cached(layer, name, a, b, s)
        lora = F.linear(F.linear(x, a), b)
        lora.mul_(c).mul_(s)
        bias = getattr(layer.base_layer, "bias", None)
        return lora.addcmul_(result - bias if bias is not None else result, cm1)

    def delta(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """PEFT's `DoraLinearLayer.forward`: what adapter `name` adds to `result` (x already in the adapter dtype)."""
        args = layer.adapter_args(name)
        a, b, s, p, _ = args
        if not (layer.training or torch.is_grad_enabled() or functorch_active()):  # (in-place steps)
            return self._delta_eval(layer, name, x, result, a, b, s)
        c = self.scale(layer, name, args=args)
        if p > 0:
            xd = layer.lora_dropout[name](x)  # the module, so the RNG is drawn as PEFT draws it
            base_result = self._base_nobias(layer, xd)
        else:
            xd, bias = x, layer.base_layer.bias if hasattr(layer.base_layer, "bias") else None
            base_result = result - bias if bias is not None else result
        lora = lora_linear(xd, None, None, a, b, s, 0.0)
        return (c - 1) * base_result + c * lora

    def add(self, layer, name: str, x, result, q4: bool, out_dtype):
        return result + self.delta(layer, name, x, result)

    def add_modules(self, layer, name: str, x, result):
        """PEFT's DoraLinearVariant.forward: through the modules (DoraLinearLayer.forward)."""
        dropout = layer.lora_dropout[name]
        base_result = result
        if not (isinstance(dropout, nn.Identity) or not layer.training):
            x, base_result = dropout(x), None
        return result + layer.lora_magnitude_vector[name](
            x, lora_A=layer.lora_A[name], lora_B=layer.lora_B[name], scaling=layer.scaling[name],
            base_layer=layer.base_layer, base_result=base_result, adapter_name=name)

    def mixed_rows(self, layer, name: str, x, result, rows, q4: bool):
        """One DoRA adapter on a sub-batch, differentiable: PEFT's variant forward on result[rows]."""
        sub = x[rows].to(layer.lora_A[name].weight.dtype)
        res = result[rows]
        result[rows] = (res + self.delta(layer, name, sub, res)).to(result.dtype)
        return x

    # --- merging (PEFT's DoraLinearVariant.merge_safe / merge_unsafe / unmerge) -----------------------------------
    def merge(self, layer, name: str, weight, ctx, live: bool):
        """W' = (m / ||W0 + ΔW||) ⊙ (W + ΔW), the norm over W0, the base with every merged adapter taken out (PEFT
        unmerges and re-merges them; here W0 is a copy, `ctx.w0`)."""
        norm = ctx.norms.get(name)
        if norm is None:
            norm = ctx.norms[name] = self._merge_norm(layer, name, ctx.w0)
        factor = layer.lora_magnitude_vector[name].weight.detach() / norm
        return (self.orient(layer, factor) * (weight + layer.get_delta_weight(name).detach())).to(weight.dtype)

    def merge_done(self, layer, name: str, ctx) -> None:
        self.merged_norm = ctx.norms[name]

    def unmerge(self, layer, name: str, weight, live: bool):
        factor = layer.lora_magnitude_vector[name].weight.detach() / self.merged_norm
        return (weight / self.orient(layer, factor) - layer.get_delta_weight(name).detach()).to(weight.dtype)

    def unmerge_done(self) -> None:
        self.merged_norm = None

    @staticmethod
    def _merge_norm(layer, name: str, unmerged: torch.Tensor) -> torch.Tensor:
        """||W0 + ΔW|| per row over the unmerged base W0 (stored layout), in W0's dtype as PEFT's get_weight_norm."""
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        w0 = unmerged.T if layer.fan_in_fan_out else unmerged
        norm, _ = dora_norm(w0, a, b, float(layer.scaling[name]))
        dtype = torch.promote_types(unmerged.dtype, layer.get_delta_weight(name).dtype)
        return norm.to(dtype)


def _base_matmul(view, dense: bool):
    """x·Wᵀ (+ bias) by our matmul over the base's current weight: cuBLAS for a dense base, nf4_linear for a 4-bit
    one."""
    if dense:
        return lambda x, bias=None: F.linear(x, view.oriented(), bias)

    def nf4(x, bias=None):
        packed, state = view.nf4()
        return nf4_linear(x, packed, state, bias)

    return nf4


def _orient(layer, v: torch.Tensor) -> torch.Tensor:
    """A per-output-row factor [out] shaped to scale the stored base weight ([out, in], or [in, out] for Conv1D)."""
    return v.view(1, -1) if layer.fan_in_fan_out else v.view(-1, 1)
