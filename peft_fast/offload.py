"""Activation offload for gradient checkpointing.

A checkpointed decoder layer keeps only its inputs for the backward's recomputation: one [tokens, hidden] tensor per
layer (22 x 16 MiB for a 1.1B Llama at 4x1024 tokens in bf16, 32 x 16 MiB for an 8B one at 2x1024), alive from the
forward until that layer's backward. `offload_checkpoints(model)` moves them to pinned host memory as the forward
saves them and brings each back one layer ahead of the backward that needs it, so GPU memory holds one or two of
them instead of all.

How: saved-tensor hooks around the forward of each module that runs a stack of transformers'
`GradientCheckpointingLayer`s (the decoder model, e.g. `LlamaModel`). Both torch checkpoint variants save a layer's
inputs through those hooks, while what the layer saves inside the checkpoint goes to the checkpoint's own hooks, so
only the checkpoint inputs, and the few large tensors the module saves outside its layers (the final norm's input),
are offloaded; layers left unchecked (transformers' `every_n_layers`) keep theirs on the device. Copies to the host
run on a side stream and overlap the forward; copies back run on a side stream one saved tensor ahead of the
backward, the first as soon as the forward ends. Nothing changes numerically: the bytes come back as they left.
transformers' own `offload=True` (`activation_checkpointing_enable`, 5.2x) runs both copies on the compute stream;
where both are on, its hooks take the checkpoint inputs first.

It is on only while gradient checkpointing is (so `Trainer`'s later `gradient_checkpointing_enable()` turns it on),
in training mode, with gradients enabled and outside `torch.compile` (a compiled step keeps its inputs on the device);
tensors below `min_bytes`, parameters (and views of them), autograd leaves, and tensors not on a CUDA device stay
where they are.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["offload_checkpoints", "offloaded_scopes"]

# Device types whose tensors are offloaded to host memory. Tests add "cpu" to run the mechanism on a CPU, where the
# "host copy" is a clone.
DEVICE_TYPES = {"cuda"}
_ATTR = "_peft_fast_offload"
_local = threading.local()  # per thread: the open (module, hooks, session) of the scopes and layers now running
_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    return stream


class _Offloaded:
    """One saved tensor in host memory, and its copy back once prefetched."""
    __slots__ = ("host", "device", "version", "copied", "index", "used", "ahead", "ahead_ready", "__weakref__")

    def __init__(self, t: torch.Tensor, index: int):
        self.device, self.version, self.index, self.used = t.device, t._version, index, False
        self.ahead = self.ahead_ready = None
        if t.device.type == "cpu":  # only when tests put "cpu" in DEVICE_TYPES
            self.host, self.copied = t.detach().clone(), None
            return
        stream = _side_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            # the same strides, so that what comes back is laid out as what left
            self.host = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True)
                         if t.is_non_overlapping_and_dense() else torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
            self.host.copy_(t, non_blocking=True)
            self.copied = stream.record_event()
        t.record_stream(stream)  # the allocator keeps t's memory until the copy has read it

    def _copy_back(self, stream) -> torch.Tensor:
        stream.wait_event(self.copied)
        with torch.cuda.stream(stream):
            return self.host.to(self.device, non_blocking=True)

    def prefetch(self) -> None:
        if self.device.type == "cpu" or self.ahead is not None:
            return
        stream = _side_stream(self.device)
        self.ahead = self._copy_back(stream)
        self.ahead_ready = stream.record_event()

    def take(self) -> torch.Tensor:
        """The tensor on its device again: the prefetched copy the first time, when there is one."""
        self.used = True
        if self.device.type == "cpu":
            return self.host
        current = torch.cuda.current_stream(self.device)
        t, self.ahead = self.ahead, None
        if t is None:
            return self._copy_back(current)
        current.wait_event(self.ahead_ready)
        t.record_stream(current)  # allocated on the side stream, used and freed on this one
        return t


class _Session:
    """The offloads of one forward of one scope; its backward consumes them, newest first."""

    def __init__(self, min_bytes: int):
        self.min_bytes = min_bytes
        self.order: list[weakref.ref] = []  # what was offloaded, in forward order
        self.seen = WeakIdKeyDictionary()  # a tensor saved by several layers (a shared mask) leaves once
        self.cursor: Optional[int] = None  # below this, nothing has been prefetched or used yet

    def pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t  # nn.Linear saves weight.t(), a view
        if (t.device.type not in DEVICE_TYPES or t.numel() * t.element_size() < self.min_bytes
                or isinstance(base, nn.Parameter) or (base.grad_fn is None and base.requires_grad)):
            return _keep(t)  # parameters, and leaves autograd keeps alive anyway
        box = self.seen.get(t)
        if box is not None and box.version == t._version:
            return box
        box = _Offloaded(t, len(self.order))
        self.seen[t] = box
        self.order.append(weakref.ref(box))
        return box

    def unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        t = packed.take()
        self.prefetch_below(packed.index)
        return t

    def prefetch_below(self, index: int) -> None:
        """Start the copy back of the newest offload below `index` not back yet: the one the backward wants next.
        One copy is ahead at a time."""
        i = index if self.cursor is None else min(index, self.cursor)
        if i == self.cursor and i < len(self.order):
            ahead = self.order[i]()
            if ahead is not None and not ahead.used:
                return  # the copy started last is still to be taken
        while i > 0:
            i -= 1
            box = self.order[i]()
            if box is not None and not box.used:
                box.prefetch()
                break
        self.cursor = i


def _keep(t):
    return t.detach()  # torch's advice: the packed value must not hold the tensor, or a saved output makes a cycle


def _same(t):
    return t


def _checkpointed_layers(module: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]


def _default_scopes(model: nn.Module) -> list[nn.Module]:
    """The modules that run a stack of checkpointable layers: the parents of lists holding them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    scopes = []
    for module in model.modules():
        for child in module.children():
            if isinstance(child, (nn.ModuleList, nn.Sequential)) and any(
                    isinstance(m, GradientCheckpointingLayer) for m in child.children()):
                scopes.append(module)
                break
    # a scope inside another adds nothing: the outer one's hooks already see its layers' inputs
    return [s for s in scopes if not any(o is not s and any(m is s for m in o.modules()) for o in scopes)]


class _Scope:
    def __init__(self, module: nn.Module, min_bytes: int, explicit: bool):
        self.min_bytes, self.explicit, self.warned = min_bytes, explicit, False
        self.module, self.layers = module, [] if explicit else _checkpointed_layers(module)
        self.handles = [module.register_forward_pre_hook(self.enter),
                        module.register_forward_hook(self.exit, always_call=True)]
        for layer in self.layers:  # a layer left unchecked (every_n_layers > 1) keeps its activations on the device
            self.handles += [layer.register_forward_pre_hook(self.enter_layer),
                             layer.register_forward_hook(self.exit, always_call=True)]

    def owns(self, module: nn.Module) -> bool:
        return module is self.module or any(module is layer for layer in self.layers)

    def active(self, module: nn.Module) -> bool:
        if not torch.is_grad_enabled() or not module.training:
            return False
        if self.explicit or any(layer.gradient_checkpointing and layer.training for layer in self.layers):
            return True
        if not self.warned:
            self.warned = True
            warnings.warn(f"offload_checkpoints: gradient checkpointing is off in {type(module).__name__}, so there "
                          "is nothing to offload; enable it (model.gradient_checkpointing_enable(), or Trainer's "
                          "gradient_checkpointing=True).", stacklevel=3)
        return False

    def enter(self, module, args):
        if torch.compiler.is_compiling():
            return
        stack = _open()
        while stack and self.owns(stack[-1][0]):  # left by a forward that an interrupt cut short
            _close(stack.pop()[1])
        session = None
        if self.active(module):
            session = _Session(self.min_bytes)
            hooks = _open_hooks(session.pack, session.unpack)
            if hooks is None:
                session = None
        stack.append((module, hooks if session is not None else None, session))

    def enter_layer(self, layer, args):
        if torch.compiler.is_compiling():
            return
        stack = _open()
        offloading = any(session is not None for m, _, session in stack if m is self.module)
        checkpointed = layer.gradient_checkpointing and layer.training and torch.is_grad_enabled()
        stack.append((layer, _open_hooks(_keep, _same) if offloading and not checkpointed else None, None))

    def exit(self, module, args, output):
        if torch.compiler.is_compiling():
            return
        stack = _open()
        if stack and stack[-1][0] is module:  # not when an earlier pre-hook raised before ours ran
            _, hooks, session = stack.pop()
            _close(hooks)
            if session is not None and session.order:
                # the newest offload is the backward's first want: its copy back starts now, behind the loss
                session.prefetch_below(len(session.order))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _open_hooks(pack, unpack):
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
    try:
        hooks.__enter__()
    except RuntimeError:  # saved-tensor hooks are disabled here (e.g. inside a torch.func transform): no offload
        return None
    return hooks


def _close(hooks) -> None:
    if hooks is not None:
        hooks.__exit__(None, None, None)


def _open() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def offloaded_scopes(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` whose checkpoint inputs are offloaded."""
    return [m for m in model.modules() if getattr(m, _ATTR, None) is not None]


def offload_checkpoints(model: nn.Module, enable: bool = True, *, min_bytes: int = 1 << 20,
                        modules: Optional[Iterable[nn.Module]] = None) -> nn.Module:
    """Keep the inputs that gradient checkpointing saves in pinned host memory between the forward and the backward
    (see the module docstring); returns the model. `enable=False` removes it.

    modules: where to offload, for models without transformers' checkpointable layers (whose checkpointing, e.g.
    `torch.utils.checkpoint` in their forward, is then always assumed on: every saved tensor of at least `min_bytes`
    outside a checkpoint is offloaded). By default, the modules that run a stack of transformers'
    `GradientCheckpointingLayer`s.
    """
    if not isinstance(min_bytes, int) or isinstance(min_bytes, bool) or min_bytes < 0:
        raise ValueError(f"offload_checkpoints: min_bytes must be a non-negative int, got {min_bytes!r}.")
    scopes = None
    if enable:
        scopes = list(modules) if modules is not None else _default_scopes(model)
        if not scopes:
            raise ValueError(f"offload_checkpoints: {type(model).__name__} has no stack of transformers' "
                             "checkpointable layers (GradientCheckpointingLayer); name the modules whose forward runs "
                             "the checkpointed layers with modules=[...].")
        owned = {id(m) for m in model.modules()}
        for scope in scopes:
            if not isinstance(scope, nn.Module) or id(scope) not in owned:
                raise ValueError(f"offload_checkpoints: modules must be submodules of the model; got "
                                 f"{type(scope).__name__}.")
    for module in offloaded_scopes(model):
        getattr(module, _ATTR).remove()
        delattr(module, _ATTR)
    for scope in scopes or ():
        setattr(scope, _ATTR, _Scope(scope, min_bytes, explicit=modules is not None))
    return model
