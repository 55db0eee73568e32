"""The forward of a mixture-of-experts layer, for transformers' experts modules, with LoRA deltas on its projections
and 4-bit expert weights (nf4_experts.py).

transformers (5.x) gives its experts modules one contract (`use_experts_implementation`): 3-D `gate_up_proj` (or
`up_proj`) and `down_proj` stacks ([E, out, in], or [E, in, out] when `is_transposed`), optional per-expert biases,
`_apply_gate` / `act_fn`, an optional post-expert norm. This is its grouped path: the routed copies of the tokens
are sorted by expert once, each projection is one grouped matmul over all experts (transformers' `_grouped_linear`,
which also runs where torch's grouped matmul does not), and the LoRA delta of each adapted projection is added to it
as one grouped LoRA (kernels/grouped_lora.py) over the same rows: no loop over experts, and no weight-sized delta
(PEFT adds B·A to every expert's weight on every call). A 4-bit stack is dequantized for its grouped matmul and
again in the backward, so that training keeps no dense copy of the experts between forward and backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..kernels import nf4_dequantize
from ..kernels.common.batch_meta import LoraBatchMeta
from ..kernels.grouped_lora import experts_meta

# What transformers' `use_experts_implementation` gives an experts module (the markers its __init__ sets).
REQUIRED = ("num_experts", "has_gate", "has_bias", "is_transposed")


def stack_shape(module: nn.Module, name: str) -> Optional[torch.Size]:
    """The shape of the expert stack `name` (dense, or 4-bit without dequantizing it), or None."""
    quantized = getattr(module, "nf4_state", None)
    state = quantized(name) if quantized is not None else None
    if state is not None:
        return state.shape
    value = module._parameters.get(name, None) if isinstance(module, nn.Module) else None
    return value.shape if isinstance(value, torch.Tensor) else None


def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module built with `use_experts_implementation` (3-D gate_up_proj or up_proj and
    down_proj stacks, num_experts, and the markers that decorator sets), whose forward takes (hidden_states,
    top_k_index, top_k_weights): the grouped path below runs it. Other modules (Llama 4's experts take no routing)
    run their own forward with the adapted weights, PEFT's way."""
    if not all(hasattr(module, a) for a in REQUIRED):
        return False
    up = stack_shape(module, "gate_up_proj") or stack_shape(module, "up_proj")
    down = stack_shape(module, "down_proj")
    return up is not None and down is not None and len(up) == 3 and len(down) == 3


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, meta: LoraBatchMeta,
                    bias: Optional[torch.Tensor], transposed: bool) -> torch.Tensor:
    from transformers.integrations.moe import _grouped_linear as grouped

    # torch's grouped matmul serves float32 and 16-bit operands; float64 (the tests' precision) loops.
    if weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return grouped(x, weight, offs, bias=bias, is_transposed=transposed)
    out = x.new_zeros(x.shape[0], weight.shape[2] if transposed else weight.shape[1])
    start = 0
    for e, c in enumerate(meta.slot_counts.tolist()):
        w = weight[e] if transposed else weight[e].t()
        out[start:start + c] = x[start:start + c] @ w
        start += c
    return out + bias if bias is not None else out


class _NF4Grouped(torch.autograd.Function):
    """x through a 4-bit expert stack: differentiable in x only (the stack is frozen), dequantized twice."""

    @staticmethod
    def forward(ctx, x, packed, state, offs, meta, transposed):
        ctx.save_for_backward(packed)
        ctx.state, ctx.offs, ctx.meta, ctx.transposed = state, offs, meta, transposed
        return _grouped_linear(x, nf4_dequantize(packed, state).to(x.dtype), offs, meta, None, transposed)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        w = nf4_dequantize(packed, ctx.state).to(grad.dtype)
        return _grouped_linear(grad.to(w.dtype), w, ctx.offs, ctx.meta, None, not ctx.transposed), None, None, \
            None, None, None


def _project(experts: nn.Module, name: str, x: torch.Tensor, offs: torch.Tensor, meta: LoraBatchMeta,
             bias: Optional[torch.Tensor], transposed: bool) -> torch.Tensor:
    quantized = getattr(experts, "nf4_state", None)
    state = quantized(name) if quantized is not None else None
    if state is None:
        return _grouped_linear(x, getattr(experts, name), offs, meta, bias, transposed)
    # bitsandbytes' compute dtype when quantize was given one, else the dtype the stack was quantized from
    compute = getattr(experts, "nf4_compute_dtype", None) or state.dtype
    out = _NF4Grouped.apply(x.to(compute), experts.packed(name), state, offs, meta, transposed)
    return out + bias if bias is not None else out


@dataclass
class Routing:
    """Where the sorted rows of one experts forward come from, for the LoRA deltas added to its projections."""

    meta: LoraBatchMeta  # the rows grouped by expert (experts as slots)
    expert_ids: torch.Tensor  # [rows]: each row's expert, sorted (expert parallelism's sentinels >= E last)
    token_of_row: torch.Tensor  # [rows]: the token each row is a routed copy of
    num_tokens: int
    shared: dict = field(default_factory=dict)  # what the projections' deltas derive once per forward


Delta = Callable[[torch.Tensor, Routing], torch.Tensor]  # (rows sorted by expert, where they come from) -> delta


def experts_forward(experts: nn.Module, deltas: dict[str, "Delta"], hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped experts forward, with `deltas[param]` added after the projection by `param`."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape[0], hidden_states.shape[-1]
    E = experts.num_experts
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // num_top_k]
    weights_g = top_k_weights.reshape(-1)[perm]
    meta = experts_meta(expert_ids_g, E)  # experts as slots: one grouping for both projections' LoRA
    routing = Routing(meta, expert_ids_g, perm // num_top_k, num_tokens)
    offs = torch.cumsum(meta.slot_counts, 0, dtype=torch.int32)
    # Expert parallelism marks the routes to other ranks' experts with ids >= E: sorted last, they get no expert
    # here (the grouped matmuls leave their rows unwritten) and must add nothing.
    sentinel = (expert_ids_g >= E).unsqueeze(-1) if getattr(experts, "_is_expert_parallel", False) else None
    ids = expert_ids_g.clamp(max=E - 1)
    if sentinel is not None:
        x = x.masked_fill(sentinel, 0.0)
    transposed, has_bias = experts.is_transposed, experts.has_bias
    has_gate = experts.has_gate

    up_name = "gate_up_proj" if has_gate else "up_proj"
    bias = getattr(experts, f"{up_name}_bias")[ids] if has_bias else None
    h = _project(experts, up_name, x, offs, meta, bias, transposed)
    if sentinel is not None:
        h = h.masked_fill(sentinel, 0.0)
    if up_name in deltas:
        h = h + deltas[up_name](x, routing).to(h.dtype)
    h = experts._apply_gate(h) if has_gate else experts.act_fn(h)
    bias = experts.down_proj_bias[ids] if has_bias else None
    out = _project(experts, "down_proj", h, offs, meta, bias, transposed)
    if sentinel is not None:
        out = out.masked_fill(sentinel, 0.0)
    if "down_proj" in deltas:
        out = out + deltas["down_proj"](h, routing).to(out.dtype)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    weighted = out * weights_g.unsqueeze(-1)
    if sentinel is not None:
        weighted = weighted.masked_fill(sentinel, 0.0)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return weighted[inv].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)
