"""A causal-LM loss that never builds the (tokens x vocab) logits: the head's matmul and the cross-entropy run in
chunks of tokens, and the gradients of the hidden states (and of the head's weight when it trains) are computed in
the same pass, so the backward is a multiply by the upstream scalar. This is the torch form of Liger-Kernel's fused
linear cross-entropy (`ops.py` uses Liger's Triton kernel when that backend is chosen); each chunk's elementwise
work can be compiled (`step=`), which fuses softmax, log-sum-exp, the one-hot and the cast into a few kernels.

Numerics follow transformers' `ForCausalLMLoss`: logits in the model's dtype, upcast to float32, mean over the
labels that are not `ignore_index` (or sum / `num_items_in_batch`, as the Trainer passes for gradient
accumulation), labels shifted unless `shift_labels` is given. Gemma 2/3's final-logit soft-capping is applied to the
float32 logits (transformers applies it in the model's dtype: the two differ by that dtype's rounding).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from peft_fast.kernels.common.autograd import differentiable_once

# Tokens per chunk are chosen so that one chunk's float32 logits take about as much memory as the hidden states.
_MIN_CHUNK = 32


def chunk_step(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
               softcap: Optional[float], want_grad: bool):
    """One chunk: (summed loss, d summed loss / d logits in the hidden states' dtype, or None). The gradient is that
    of the sum, entries in [-1, 1], so that a 16-bit copy neither underflows nor overflows; the reduction's scale
    (1 / tokens) is applied in float32 afterwards."""
    logits = _upcast(h @ weight.t())
    if softcap is not None:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    lse = torch.logsumexp(logits, dim=-1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    if not want_grad:
        return loss, None
    # d loss / d logits = softmax - one_hot, in place over the logits (one [chunk, vocab] buffer, not four).
    grad = logits.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, safe.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
    grad.mul_(valid.to(grad.dtype).unsqueeze(1))
    if softcap is not None:
        grad.mul_(capped.mul_(capped).neg_().add_(1))
    return loss, grad.to(h.dtype)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 as transformers' loss upcasts (float64 stays float64, for the tests' exact comparisons)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _chunk_rows(n: int, vocab: int, hidden: int) -> int:
    rows = math.ceil(n / max(1, math.ceil(vocab / hidden)))
    return min(n, max(_MIN_CHUNK, 1 << max(0, rows - 1).bit_length()))


def _run(h, weight, target, ignore_index, softcap, scale, step, want_h, want_w):
    n = h.shape[0]
    rows = _chunk_rows(n, weight.shape[0], weight.shape[1])
    want = want_h or want_w
    acc = torch.promote_types(h.dtype, torch.float32)
    # The hidden states' gradient waits for the upstream gradient in float32 when h is float16: a loss scaler's
    # factor is applied to it in backward, and float16 could not hold the unscaled small values.
    grad_h = torch.empty(h.shape, dtype=acc if h.dtype == torch.float16 else h.dtype, device=h.device) \
        if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
    total = h.new_zeros((), dtype=acc)
    # Gradients of a batch whose labels are all ignored are zeros, as transformers' mean gives them (not 0 * inf).
    grad_scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
    for start in range(0, n, rows):
        hc = h[start:start + rows]
        loss, g = step(hc, weight, target[start:start + rows], ignore_index, softcap, want)
        total = total + loss
        if want_h:
            grad_h[start:start + rows] = (g @ weight).to(acc).mul_(grad_scale)
        if want_w:
            grad_w.addmm_(g.t().to(acc), hc.to(acc))
    if want_w:
        grad_w.mul_(grad_scale)
    return total * scale, grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, ignore_index, softcap, scale, step):
        loss, grad_h, grad_w = _run(h, weight, target, ignore_index, softcap, scale, step,
                                    ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.h_dtype = weight.dtype, h.dtype
        return loss

    # The gradients were computed in forward: a second differentiation would miss their dependence on h and the
    # weight, so create_graph=True is refused rather than silently wrong.
    @staticmethod
    @differentiable_once
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # The upstream factor (1, or a loss scaler's) multiplies in float32, then the result takes the input's dtype.
        dh = (grad_h.to(grad_out.dtype) * grad_out).to(ctx.h_dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                         softcap: Optional[float] = None, num_items_in_batch=None,
                         step: Callable = chunk_step) -> torch.Tensor:
    """Cross-entropy of (h @ weight.T) against target, h (N, H), weight (V, H), target (N,), in chunks of tokens."""
    valid = (target != ignore_index).sum()
    denom = valid if num_items_in_batch is None else num_items_in_batch
    scale = 1.0 / torch.as_tensor(denom, device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h, weight, target, ignore_index, softcap, scale, step)
    return _run(h, weight, target, ignore_index, softcap, scale, step, False, False)[0]


def shifted_labels(labels: torch.Tensor, ignore_index: int, shift_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """The next-token targets as transformers' ForCausalLMLoss makes them, flattened."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None, num_items_in_batch=None,
                   softcap: Optional[float] = None, step: Callable = chunk_step, **_: object) -> torch.Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden), labels, ...) without the logits."""
    target = shifted_labels(labels, ignore_index, shift_labels).to(hidden.device)
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, target, ignore_index=ignore_index,
                                softcap=softcap, num_items_in_batch=num_items_in_batch, step=step)


def causal_lm_loss_reference(hidden, weight, labels, *, ignore_index=-100, shift_labels=None,
                             num_items_in_batch=None, softcap=None, **_: object) -> torch.Tensor:
    """The unfused definition: full logits, then transformers' loss."""
    logits = _upcast(hidden @ weight.t())
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    target = shifted_labels(labels, ignore_index, shift_labels).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=ignore_index,
                           reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch
