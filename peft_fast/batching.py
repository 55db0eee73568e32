"""Mixed-adapter batches: what one forward pass of a mixed batch shares across all its layers (the batch plan)."""
from __future__ import annotations

import torch

from .kernels import make_lora_batch_meta
from .names import BASE_NAME as BASE


class AdapterNames(list):
    """The ``adapter_names`` handed to each layer: the user's one-name-per-sample list, plus what every layer of
    one forward pass shares. Slots number the model's adapters in one global order, so one token-to-slot mapping
    (and its grouping metadata, built once per batch shape) serves all layers."""

    def __init__(self, names: list[str], slot_names: tuple[str, ...]):
        super().__init__(names)
        self.slot_names = slot_names
        index = {n: i for i, n in enumerate(slot_names)}
        self.sample_slots = [index.get(n, -1) if n != BASE else -1 for n in names]
        self._meta: dict = {}

    def meta_for(self, x: torch.Tensor):
        """Token-to-slot metadata for activations ``x`` of shape [batch, ..., features]."""
        key = (tuple(x.shape[:-1]), x.device)
        if key not in self._meta:
            per_sample = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1
            slots = torch.tensor(self.sample_slots, dtype=torch.int32)
            token_slots = slots.repeat_interleave(per_sample).to(x.device)
            self._meta[key] = make_lora_batch_meta(token_slots, len(self.slot_names), validate=False)
        return self._meta[key]
