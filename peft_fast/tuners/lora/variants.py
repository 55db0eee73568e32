"""LoRA layer variants (PEFT's LoraVariant): what one adapter of a LoRA layer computes, merges and contributes to
a mixed batch. Plain LoRA is `Lora`; DoRA (dora.py) is the other variant. A layer keeps one variant object per
adapter (`layer.lora_variant[name]`), chosen once, where the adapter is created, from its config.

What a variant provides:
- `init(layer, name)`: after A and B exist (DoRA: its magnitude).
- `fused(layer, name, x)`: at plan time, a callable(x) running this adapter alone over the base in one fused op,
  or None when the base cannot be fused (the layer then runs the base module and `add`s each adapter).
- `add(layer, name, x, result, q4, out_dtype)`: PEFT's per-adapter step after the base output.
- `mixed_rows(...)` / `mixed_scale(...)`: its rows of a mixed batch (differentiable), and its per-channel scale in
  the batched kernels (None: plain LoRA).
- `merge(...)` / `unmerge(...)`: the merge rule on a base weight in its stored layout.
- `clear()`: forget cached values.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...kernels import lora_linear, lora_linear_reference, lora_linear_triton, qlora_linear_reference, \
    qlora_linear_triton, use_triton


def op_args(a, b, bias, scaling, p) -> tuple:
    """(A, B, scaling, dropout p, B's bias) as the ops take them. A tensor scaling (prepared for compiled hotswap)
    may change value without a recompile: it is folded into B, a tiny [out, r] product, and the op sees 1.0."""
    if isinstance(scaling, torch.Tensor):
        return a, b * scaling, 1.0, p, (bias * scaling if bias is not None else None)
    return a, b, scaling, p, bias


def nf4_fallback(layer, view, name: str, run):
    """`run` over a 4-bit base while the base's weight is in a form the kernels read; otherwise (bitsandbytes
    repacked it for its own CPU kernel since the plan was made) the base module and PEFT's adapter step."""
    def guarded(x):
        if view.nf4() is None:
            return layer.loop(x, layer.base_layer(x), [name])
        return run(x)

    return guarded


class LoraVariant:
    name = "lora"
    scales_channels = False  # whether the variant scales output channels (DoRA): mixed batches then need c

    hotswappable = True  # whether hotswap may copy a new adapter's weights into it in place

    def check(self, layer, config) -> None:
        """Refuse a base or config this variant cannot work with (before the adapter is created)."""

    def file_tensors(self, out_features: int) -> dict[str, tuple[int, ...]]:
        """Tensors the variant adds to an adapter's file, by file key relative to the layer."""
        return {}

    def init(self, layer, name: str) -> None:
        pass

    def clear(self) -> None:
        pass

    def mixed_scale(self, layer, name: str) -> Optional[torch.Tensor]:
        return None

    def unmerge_done(self) -> None:
        pass


class Lora(LoraVariant):
    """Plain LoRA: y = base(x) + s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B)."""

    def __reduce__(self) -> str:
        # One instance (LORA), which layers test by identity: deepcopy and pickle give it back, not a copy.
        return "LORA"

    def fused(self, layer, name: str, x: torch.Tensor):
        """The op for this adapter alone over a plain dense base (lora_linear) or an NF4 base (qlora_linear), with
        the implementation chosen now; everything else (parameters, scaling, dropout) is read at call time."""
        view = layer.base_view
        a, b = layer.adapter_args(name)[:2]
        dense = view.fused_dense()
        if dense is not None:
            op = lora_linear_triton if use_triton(x, dense[0], a, b) else lora_linear_reference
            params, transposed, adapter = view.module._parameters, view.fan_in_fan_out, layer.adapter_reader(name)

            def run_dense(x):
                w = params["weight"]
                return op(x, w.T if transposed else w, params.get("bias"), *adapter())

            return run_dense
        q = view.fused_nf4(x)
        if q is None:
            return None
        cast = q[3]
        op = qlora_linear_triton if use_triton(x, q[0], a, b) else qlora_linear_reference
        params, adapter = view.module._parameters, layer.adapter_reader(name)

        def run_nf4(x):
            packed, state = view.nf4()
            if cast is not None:  # float32 activations into a 16-bit compute dtype: run in it, cast back
                return op(x.to(cast), packed, state, params.get("bias"), *adapter()).to(x.dtype)
            return op(x, packed, state, params.get("bias"), *adapter())

        return nf4_fallback(layer, view, name, run_nf4)

    def add(self, layer, name: str, x, result, q4: bool, out_dtype):
        d = lora_linear(x, None, None, *layer.adapter_args(name))
        return result + (d.to(out_dtype) if q4 else d)

    def mixed_rows(self, layer, name: str, x, result, rows, q4: bool):
        a = layer.adapter_args(name)
        x = x.to(a[0].dtype) if q4 else x  # PEFT's 4-bit layer keeps x cast to the last adapter's dtype
        result[rows] += lora_linear(x[rows], None, None, *a).to(result.dtype)
        return x

    def merge(self, layer, name: str, weight, ctx, live: bool):
        return layer.base_view.merge_add(weight, layer.get_delta_weight(name), live)

    def unmerge(self, layer, name: str, weight, live: bool):
        return layer.base_view.merge_sub(weight, layer.get_delta_weight(name), live)


LORA = Lora()  # stateless: every plain adapter shares it
