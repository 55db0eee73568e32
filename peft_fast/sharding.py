"""Models sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): their parameters are DTensors between forward
calls. Training, saving (gathered on every rank) and loading values into existing adapters work on them; what
would change the set of parameters FSDP manages, or rewrite base weights shard by shard, is refused with a way
to do it instead."""
from __future__ import annotations

import functools
from typing import Callable

import torch.nn as nn

UNSHARDED_WAY = ("save the adapter (save_pretrained on every rank), load it onto the unsharded base model in one "
                 "process (PeftModel.from_pretrained) and {what} there, or do it before fully_shard()")


def is_sharded(tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def check_unsharded(model: nn.Module, what: str) -> None:
    if sharded(model):
        raise RuntimeError(f"{what} on a model sharded by FSDP2 (its parameters are DTensors) is not supported: "
                           + UNSHARDED_WAY.format(what=what) + ".")


def unsharded_only(what: str) -> Callable:
    """Decorate a PeftModel method that must not run on a sharded model."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def checked(self, *args, **kwargs):
            check_unsharded(self, what)
            return method(self, *args, **kwargs)
        return checked
    return wrap
