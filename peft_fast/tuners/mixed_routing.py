"""Mixed-batch routing for TunerModel: a batch's adapter names checked and turned into the batch plan its layers
read (slots in a table stable across adapter events, padded to a power of two so that compiled forwards keep their
shapes), the layers readied for it after an event, all outside any traced code."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn

from ..batching import PREPARE_LOCK, SERVING, AdapterNames, routing
from ..names import BASE_NAME
from . import injection


class MixedBatchRouting:
    """What TunerModel does for `adapter_names` (it holds `model`, `peft_config`, `_batch_key`, `adapter_layers`)."""

    @contextmanager
    def mixed_batch(self, adapter_names: Optional[list[str]], num_beams: Optional[int] = None):
        """Route ``adapter_names`` (one per sample) to this model's adapter layers for the duration of a call, in
        this thread only (batching.routing)."""
        if adapter_names is None:
            yield
            return
        with SERVING.serving(), routing(self.batch_plan(adapter_names, num_beams)):
            yield

    @torch.compiler.disable
    def batch_plan(self, adapter_names: list[str], num_beams: Optional[int] = None) -> AdapterNames:
        """The checked batch plan of ``adapter_names`` for this model's layers (never traced: names are strings)."""
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple, AdapterNames)):
            raise TypeError(f"Got adapter names of type {type(adapter_names).__name__}, expected a list of str.")
        for i, n in enumerate(adapter_names):
            if not isinstance(n, str):
                raise TypeError(f"adapter_names holds {n!r} ({type(n).__name__}) at position {i}: every sample needs "
                                f"an adapter name (str), or {BASE_NAME!r} for the base model alone.")
        # Under the lock: an adapter added or deleted by another thread changes the configs, the slot table and the
        # module tree this reads (add_adapter / delete_adapter hold it throughout)
        with PREPARE_LOCK:
            unknown = {n for n in adapter_names if n != BASE_NAME} - set(self.peft_config)
            if unknown:
                raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
            slots = self._slot_table()
            device = self._adapter_device()
            encoder = None
            if isinstance(num_beams, int) and num_beams > 1:
                # Beam search repeats every sample num_beams times, except in an encoder (the original batch).
                get_encoder = getattr(self.model, "get_encoder", None)
                module = get_encoder() if callable(get_encoder) else None
                if module is not None and module is not self.model:
                    ids = frozenset(id(m) for _, m in injection.tuner_layers(module))
                    encoder = (ids, AdapterNames(list(adapter_names), slots, self._batch_key, device=device,
                                                 prepared=True))
                adapter_names = [n for n in adapter_names for _ in range(num_beams)]
            if self._batch_key.stale:  # after an event: ready the layers here, outside any compiled forward
                if any(layer.merged for _, layer in self.adapter_layers()):  # (a merge is an event) refused before
                    # the stacks are readied: slots made from merged weights would outlive the unmerge
                    raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                                     "`unmerge_adapter` first.")
                for _, layer in self.adapter_layers():
                    layer.prepare_mixed(slots)
                self._batch_key.stale = False
        return AdapterNames(list(adapter_names), slots, self._batch_key, encoder, device, prepared=True)

    def _adapter_device(self) -> Optional[torch.device]:
        """The device of the first adapter part found (per batch: without listing any layer's parameters)."""
        for _, layer in self.adapter_layers():
            for _, part in layer.adapter_parts():
                p = next(part.parameters(), None) if isinstance(part, nn.Module) else part
                if p is not None:
                    return p.device
        return None

    def _slot_table(self) -> tuple:
        """Each adapter's slot in the layers' stacks, stable while it exists: a new adapter takes the first free slot
        (None) or a new one at the end, a deleted one frees its slot, so no other adapter's slot moves and the
        layers rewrite only the slots that changed (and a batch another thread runs keeps its slots)."""
        table = getattr(self, "_slots", [])
        names = set(self.peft_config)
        table = [n if n in names else None for n in table]
        for name in sorted(names - set(table)):
            if None in table:
                table[table.index(None)] = name
            else:
                table.append(name)
        while table and table[-1] is None:
            table.pop()
        self._slots = table
        # Padded with free slots to a power of two: the stacks' and batch plans' shapes (which a compiled forward
        # guards on) then change only when the adapters outgrow it, not with every adapter added or deleted
        return tuple(table) + (None,) * (_pow2(len(table)) - len(table))

    def claim_layers(self) -> None:
        """Mark this model's adapter layers as the ones its mixed batches reach (after layers are added)."""
        for _, m in injection.tuner_layers(self.model):
            m._batch_key = self._batch_key


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else n
