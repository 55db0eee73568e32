"""Mixed-adapter batches: what one forward pass of a mixed batch shares across all its layers (the batch plan),
and how it reaches them.

`adapter_names` (one name per sample) become an `AdapterNames` once per forward. It reaches the layers through
per-call state of the calling thread (`CURRENT`), set by the model's forward for the duration of the call: not
through hooks on the shared modules, so concurrent callers with different mixes (and plain forwards beside them)
never see each other's batch, and no module is touched per call. Under torch.compile a layer's read of that state
is traced like an attribute of a plain object: the batch's tensors are graph inputs, so a new mix of adapters at
the same batch shape reuses the compiled graph.
"""
from __future__ import annotations

import functools
import math
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from .kernels import make_lora_batch_meta
from .names import BASE_NAME as BASE


class AdapterNames:
    """The ``adapter_names`` a layer sees: the user's one-name-per-sample list, plus what every layer of one forward
    pass shares. Slots number the model's adapters in one global order, so one token-to-slot mapping (and its
    grouping metadata, built once per batch shape) serves all layers. `owner` is the routing key of the model
    whose layers take this batch; under beam search an encoder's layers take `encoder` (the original batch).
    `prepared`: the owner's layers were readied for these slots before the forward (its batch plan), so that a
    compiled forward may take their stacks without comparing slot tables (which would guard on the adapters'
    names, and recompile whenever one is added)."""

    def __init__(self, names: list[str], slot_names: tuple[Optional[str], ...], owner: object = None,
                 encoder: Optional[tuple[frozenset, "AdapterNames"]] = None, device: Optional[torch.device] = None,
                 prepared: bool = False):
        self._names = list(names)
        self.slot_names = slot_names
        self.owner, self.encoder, self.prepared = owner, encoder, prepared
        index = {n: i for i, n in enumerate(slot_names) if n is not None}
        # On the model's device from the start: a compiled (or CUDA-graph) forward then reads a device tensor.
        self.sample_slots = torch.tensor([index.get(n, -1) if n != BASE else -1 for n in names], dtype=torch.int32,
                                         device=device)
        self._meta: dict = {}

    # A sequence of the names, not a list: traced code reading a list guards on its length, and a compiled forward
    # would recompile for every batch size instead of going dynamic.
    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self):
        return iter(self._names)

    def __getitem__(self, i):
        return self._names[i]

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, tuple, AdapterNames)) and self._names == list(other)

    __hash__ = None  # (as a list's)

    def __repr__(self) -> str:
        return repr(self._names)

    def for_layer(self, layer) -> "AdapterNames":
        if self.encoder is not None and id(layer) in self.encoder[0]:
            return self.encoder[1]
        return self

    def meta_for(self, x: torch.Tensor):
        """Token-to-slot metadata for activations ``x`` of shape [batch, ..., features]: built once per shape and
        shared by the layers; under torch.compile built inline (static-shape ops, nothing kept)."""
        if torch.compiler.is_compiling():
            return self._make_meta(x)
        key = (tuple(x.shape[:-1]), x.device)
        meta = self._meta.get(key)
        if meta is None:
            if len(self._meta) >= _META_SHAPES:  # oldest first: a patched PEFT model keeps one per thread and mix
                self._meta.pop(next(iter(self._meta)))
            meta = self._meta[key] = self._make_meta(x)
        return meta

    def _make_meta(self, x: torch.Tensor):
        per_sample = math.prod(x.shape[1:-1]) if x.dim() > 1 else 1  # (x[0] fails on an empty batch)
        token_slots = self.sample_slots.to(x.device).repeat_interleave(per_sample)
        return make_lora_batch_meta(token_slots, len(self.slot_names), validate=False)


# Shapes of activations one forward's layers see (a decoder's: one; an encoder-decoder's or a VLM's: a few); a
# patched PEFT model reuses its names across forwards (one per thread), whose lengths vary as generate goes on.
_META_SHAPES = 8


class RoutingKey:
    """What a model's mixed batches carry and its layers match. `stale`: a layer changed since the layers last got
    ready for mixed batches (their stacks), so the next batch plan readies them again before the forward."""

    stale = True


class _Current(threading.local):
    def __init__(self) -> None:  # runs once in each thread that reads it
        # The mixed batch of the forward running in this thread. An instance attribute, not a class default: torch
        # 2.11's torch.compile read a thread-local's class default where the instance had its own value.
        self.batch: Optional[AdapterNames] = None


class _ServeLock:
    """Mixed batches in flight (many at once) against adapter changes (one at a time): `changing()` waits until no
    other thread is serving a mixed batch and holds new ones until it is done, so a batch never meets a half-added
    or half-deleted adapter, nor a slot table that changed under it. A thread may change adapters from inside its own
    batch (it then waits for the others only; a second thread doing so at once is refused, as the two would wait
    for each other), and may nest batches; a waiting change goes before new batches."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread ident -> depth
        self._writer: Optional[int] = None
        self._depth = 0
        self._waiting = 0
        self._serving_waiters: set[int] = set()  # waiting changers that are inside a batch of their own

    @contextmanager
    def serving(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if me not in self._readers and self._writer != me:
                while self._writer is not None or self._waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextmanager
    def changing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                serving = me in self._readers
                if serving and self._serving_waiters:
                    # each would wait for the other's batch to end
                    raise RuntimeError("A change of adapters from inside a mixed batch, while another thread "
                                       "serving one waits to change them too: the two would wait for each other "
                                       "forever. Change adapters outside the forward (or from one thread).")
                self._waiting += 1
                if serving:
                    self._serving_waiters.add(me)
                try:
                    while self._writer is not None or any(t != me for t in self._readers):
                        self._cond.wait()
                finally:  # (an interrupted wait must not hold new batches back for good)
                    self._waiting -= 1
                    self._serving_waiters.discard(me)
                    self._cond.notify_all()
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()


CURRENT = _Current()
# Held by every mixed batch for its whole forward (or generate), and by what changes adapters (changes_adapters).
SERVING = _ServeLock()
# Held while layers write what mixed batches read (their adapter stacks, after an event): threads that start
# serving at once then write them one at a time, and none reads a half-written or replaced stack.
PREPARE_LOCK = threading.RLock()


def changes_adapters(fn: Callable) -> Callable:
    """For what changes the adapters mixed batches read (adding, deleting, loading weights, merging, activating,
    hot-swapping): it waits for the batches other threads are serving and holds new ones until it is done, so that
    no batch meets half of the change."""
    @functools.wraps(fn)
    def changing(*args: Any, **kwargs: Any) -> Any:
        with SERVING.changing(), PREPARE_LOCK:
            return fn(*args, **kwargs)

    return changing


def batch_for(layer) -> Optional[AdapterNames]:
    """The mixed batch `layer` takes in the forward running in this thread, if its model started one."""
    batch = CURRENT.batch
    if batch is None or batch.owner is not layer._batch_key:
        return None
    return batch.for_layer(layer)


@torch.compiler.disable
def enter_batch(batch: Optional[AdapterNames]) -> Optional[AdapterNames]:
    """Make `batch` this thread's mixed batch; returns the one it replaces, for leave_batch (never traced)."""
    previous = CURRENT.batch
    CURRENT.batch = batch
    return previous


@torch.compiler.disable
def leave_batch(previous: Optional[AdapterNames]) -> None:
    CURRENT.batch = previous


@contextmanager
def routing(batch: Optional[AdapterNames]) -> Iterator[None]:
    """Make `batch` this thread's mixed batch for the duration of the block (nested calls restore the outer one)."""
    previous = enter_batch(batch)
    try:
        yield
    finally:
        leave_batch(previous)
