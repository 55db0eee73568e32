"""What a VeRA layer computes: y = base(x) + Λ_b ⊙ (B_s · (Λ_d ⊙ (A_s · dropout(x)))), A_s = vera_A[:, :in],
B_s = vera_B[:out, :], summed over the active adapters.

Two routes, decided once per plan key (TunerLayer.plan):
- With autograd (training): PEFT's order of operations, torch matmuls on the shared projections' slices. Folding
  the vectors into A and B would make the backward compute full [r, in] and [out, r] gradients for them; this way
  the vectors' gradients are row sums of activations PEFT keeps anyway.
- Without autograd (inference), one adapter, no active dropout: Λ_d is folded into A's rows and Λ_b into B's rows
  (Λ_d ⊙ (A·x) = (diag(Λ_d)·A)·x, equal up to float rounding), kept per adapter until a vector or projection
  changes, and the layer runs the LoRA op over its base: `lora_linear` on a dense base, `qlora_linear` on a 4-bit
  one (Triton on CUDA), with scaling 1. On the CPU a dense base runs x·Wᵀ then adds (x·A'ᵀ)·B'ᵀ into it in place.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import lora_linear_triton, qlora_linear_reference, qlora_linear_triton, use_triton
from ...kernels.common.autocast import autocast_on
from ...kernels.common.backend import functorch_active, keeps_no_state


class VeraPlan:
    __slots__ = ("layer", "active", "fused", "params")

    def __init__(self, layer, active: list[str], fused):
        self.layer, self.active, self.fused = layer, active, fused
        view = layer.base_view
        # A plain nn.Linear: its matmul run directly, and its output (fresh, kept by no backward) updated in place.
        self.params = view.module._parameters if view.fused_dense() is not None and not view.fan_in_fan_out else None

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            return self.layer.loop(x, self.layer.base_layer(x, *args, **kwargs), self.active)
        if self.fused is not None:
            return self.fused(x)
        if self.params is not None:
            base = F.linear(x, self.params["weight"], self.params.get("bias"))
            return self.layer.loop(x, base, self.active, fresh=True)
        return self.layer.loop(x, self.layer.base_layer(x), self.active)


def _version(t: torch.Tensor) -> tuple:
    return id(t), t.data_ptr(), t._version, t.device, t.dtype


class VeraCompute:
    """Mixed into the layer: its launch plans and the folded weights they use."""

    def make_plan(self, x: torch.Tensor):
        active = [a for a in self.active_adapters if a in self.vera_lambda_d]
        if self.merged or not active:
            return self.base_layer
        fused = None
        if len(active) == 1 and not torch.is_grad_enabled() and not self._drops(active[0]):
            fused = self._fused(active[0], x)
        return VeraPlan(self, active, fused)

    def _drops(self, name: str) -> bool:
        dropout = self.vera_dropout[name]
        return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0

    def slices(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's parts of the shared projections: A [r, in] and B [out, r] (views, no copies)."""
        return self.vera_A[name][:, :self.in_features], self.vera_B[name][:self.out_features, :]

    def loop(self, x: torch.Tensor, result: torch.Tensor, active: list[str], fresh: bool = False) -> torch.Tensor:
        """PEFT's adapter loop after the base output `result` (x cast to each adapter's dtype, as PEFT keeps it).
        `result + Λ_b ⊙ v` is one addcmul, into `result` itself when it is `fresh` (made for this call, held by
        nothing else) and of the sum's dtype; PEFT's mul-then-add makes two passes over an [tokens, out] tensor."""
        x_dtype, out_dtype = x.dtype, result.dtype
        for name in active:
            lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
            a, b = self.slices(name)
            if x.dtype != lambda_d.dtype:
                x = x.to(lambda_d.dtype)
            v = F.linear(lambda_d * F.linear(self.vera_dropout[name](x), a), b)
            if fresh and result.dtype == v.dtype:
                result = result.addcmul_(lambda_b, v)
            else:
                result = torch.addcmul(result, lambda_b, v)
                fresh = True  # a new tensor of the promoted dtype
        return result.to(out_dtype).to(x_dtype)

    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        raise ValueError("VeRA adapters do not support mixed adapter batches (`adapter_names`): Hugging Face PEFT "
                         "ignores the argument for them and runs the active adapter(s) on every sample. Run one "
                         "batch per adapter with set_adapter(...) instead.")

    # --- inference: folded weights through the LoRA ops -----------------------------------------------------------
    def folded(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag(Λ_d)·A_s, diag(Λ_b)·B_s), contiguous, cached until one of the four tensors changes."""
        parts = (self.vera_lambda_d[name], self.vera_lambda_b[name], self.vera_A[name], self.vera_B[name])
        if keeps_no_state():  # traced or transformed code keeps no state: it folds in the graph
            a, b = self.slices(name)
            return parts[0][:, None] * a, parts[1][:, None] * b
        key = tuple(_version(t) for t in parts)
        hit = self._folded.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            a, b = self.slices(name)
            pair = ((parts[0][:, None] * a).contiguous(), (parts[1][:, None] * b).contiguous())
        self._folded[name] = (key, pair, parts)  # the tensors too: no id in the key is reused while it is kept
        return pair

    def _fused(self, name: str, x: torch.Tensor):
        """A callable(x) running the base and this adapter in one LoRA op, or None where the base has no such op."""
        view = self.base_view
        dense = view.fused_dense()
        if dense is not None:
            params, transposed = view.module._parameters, view.fan_in_fan_out
            if use_triton(x, dense[0]):
                def run_triton(x):
                    w = params["weight"]
                    return lora_linear_triton(x, w.T if transposed else w, params.get("bias"), *self.folded(name),
                                              1.0)

                return run_triton

            def run_torch(x):
                w = params["weight"]
                a, b = self.folded(name)
                y = F.linear(x, w.T if transposed else w, params.get("bias"))
                z = F.linear(x if x.dtype == a.dtype else x.to(a.dtype), a)
                if autocast_on(x.device):  # autocast's dtypes (addmm_ is not autocast), then x's
                    return (y + F.linear(z, b)).to(x.dtype)
                if functorch_active():  # (vmap refuses in-place steps)
                    return y + F.linear(z, b)
                if y.dtype != z.dtype:  # a 16-bit base under float32 vectors: PEFT's float32 sum, rounded once
                    return (y + F.linear(z, b)).to(y.dtype)
                # No autograd here: the delta goes into the fresh base output in place (measured 4-12% faster per
                # decode call on a CPU than lora_linear_reference's scale-and-add, which is no faster than PEFT).
                return y.view(-1, y.shape[-1]).addmm_(z.view(-1, z.shape[-1]), b.t()).view(y.shape)

            return run_torch
        q = view.fused_nf4(x)
        if q is None:
            return None
        cast = q[3]
        op = qlora_linear_triton if use_triton(x, q[0]) else qlora_linear_reference
        params = view.module._parameters

        def run_nf4(x):
            weights = view.nf4()
            if weights is None:  # bitsandbytes repacked the weight for its own CPU kernel since the plan was made
                return self.loop(x, self.base_layer(x), [name])
            if cast is not None:  # float32 activations into a 16-bit compute dtype: run in it, cast back
                return op(x.to(cast), *weights, params.get("bias"), *self.folded(name), 1.0).to(x.dtype)
            return op(x, *weights, params.get("bias"), *self.folded(name), 1.0)

        return run_nf4
