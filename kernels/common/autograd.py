"""One factory for the differentiable fused ops: a custom-op pair that torch.compile sees, and a plain
autograd.Function over the same implementations for eager training.

torch.library's dispatch (argument binding, defaults, redispatch) costs tens of µs per call, twice per layer per
training step, which is host time a step of small layers waits for; eager training therefore calls the
implementations through an autograd.Function, and eager inference calls the forward implementation directly.
Under torch.compile the custom ops (with fake implementations and registered autograd) keep the graph whole.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch


class FusedOp:
    """`name`_fwd / `name`_bwd custom ops in the `peft_fast` namespace, from annotated implementations.

    - forward(*args) -> tuple of outputs, the first the only differentiable one (the rest are kept for backward);
      forward_fake(*args) likewise, for fake tensors. Calling the FusedOp returns that first output alone.
    - backward_impl(...) -> tuple of tensors (the backward op); backward_fake likewise.
    - setup_context(ctx, inputs, outputs) saves what backward needs.
    - backward(ctx, *grads, bwd) -> one gradient per forward input; `bwd` is the backward op under torch.compile
      and backward_impl itself in eager training.
    """

    def __init__(self, name: str, *, forward: Callable, forward_fake: Callable, backward_impl: Callable,
                 backward_fake: Callable, setup_context: Callable, backward: Callable):
        self.forward = forward
        self.fwd_op = torch.library.custom_op(f"peft_fast::{name}_fwd", forward, mutates_args=())
        self.fwd_op.register_fake(forward_fake)
        self.bwd_op = torch.library.custom_op(f"peft_fast::{name}_bwd", backward_impl, mutates_args=())
        self.bwd_op.register_fake(backward_fake)
        self.fwd_op.register_autograd(functools.partial(backward, bwd=self.bwd_op), setup_context=setup_context)

        def eager_forward(ctx, *args):
            # One output, the differentiable one: the others are saved for backward as intermediates, so autograd
            # neither wraps them nor fills zero gradients for them (a DoRA-with-dropout layer would get a
            # [tokens, out] one), and a Function with one output is cheaper host time per call.
            ctx.set_materialize_grads(False)
            out = forward(*args)
            setup_context(ctx, args, out)
            ctx.kept = len(out) - 1
            return out[0]

        @differentiable_once
        def eager_backward(ctx, dy):
            if dy is None:  # no gradient reached the output (an undefined one, unmaterialized)
                return (None,) * len(ctx.needs_input_grad)
            return backward(ctx, dy, *(None,) * ctx.kept, bwd=backward_impl)

        self.eager = type(f"_Eager_{name}", (torch.autograd.Function,),
                          {"forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)})

    def __call__(self, *args, needs_grad: bool):
        """The differentiable output, by the cheapest route that still gives autograd (or compile) what it needs."""
        if torch.compiler.is_compiling():
            return self.fwd_op(*args)[0]
        if needs_grad:
            return self.eager.apply(*args)
        return self.forward(*args)[0]


def differentiable_once(backward: Callable) -> Callable:
    """A custom Function's backward that refuses a second differentiation (create_graph=True), which would
    differentiate only the parts written in torch (dy·W) and silently drop the kernels' part. torch's
    once_differentiable refuses only when the incoming gradient requires grad; a loss linear in the output gives a
    constant one, so the refusal is attached to every gradient here. Without create_graph it costs one grad-mode
    check."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            out = backward(ctx, *grads)
        outs = out if isinstance(out, tuple) else (out,)
        if all(g is None for g in outs):
            return out
        refuse = torch._C._functions.DelayedError(
            b"peft_fast: trying to differentiate twice a fused op (its backward runs kernels autograd cannot "
            b"differentiate; create_graph=True cannot go through it)", len(outs))
        return refuse(*(g.detach().requires_grad_() if g is not None else None for g in outs))

    return wrapper


def needs_grad(*tensors) -> bool:
    """Whether autograd must record an op over these tensors (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class OpaqueOp:
    """A forward-only kernel call (no gradient flows through it) as one `peft_fast::name` custom op under
    torch.compile, which then keeps the graph whole around it instead of tracing into Triton's launch, while eager
    calls run `eager` (default: `impl`) directly, since torch.library's dispatch costs tens of µs. `impl` and
    `fake` take the same annotated arguments; `impl`'s outputs must be new tensors (`eager` may return an input)."""

    def __init__(self, name: str, impl: Callable, fake: Callable, eager: Optional[Callable] = None):
        self.impl = eager or impl
        self.op = torch.library.custom_op(f"peft_fast::{name}", impl, mutates_args=())
        self.op.register_fake(fake)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.impl(*args)
