"""Trainable tokens (`trainable_token_indices`): chosen rows of an embedding trained as adapter parameters beside a
tuner's adapter, as PEFT's TrainableTokensWrapper / TrainableTokensLayer do it, with PEFT's parameter names and file
key (`<path>.token_adapter.trainable_tokens_delta`). Each adapter's rows start as a copy of the embedding's current
rows, so a new adapter leaves the outputs unchanged.

The wrapper subclasses ModulesToSaveWrapper: the shared machinery that handles module copies (finding adapter
parameters, freezing the original, activation, deletion, unloading) handles it too; its `modules_to_save` maps each
adapter to a view of its rows. With tied embeddings, the output layer that shares the input embedding's weight gets a
tied wrapper that reads the embedding's rows, so one delta trains both and is saved once, as in PEFT.

The forward never builds a patched copy of the whole table (PEFT's `index_copy` per call): an embedding looks its
trainable tokens up in a token -> row table and takes those rows from the delta; an output layer recomputes only the
columns of the trainable tokens.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batching import batch_for
from ..names import BASE_NAME
from .base_layer import check_adapter_names
from .modules_to_save import ModulesToSaveWrapper

_UPCAST = (torch.float16, torch.bfloat16)  # what PEFT's autocast_adapter_dtype turns into float32


class _Buffers(nn.Module):
    """Non-persistent buffers by adapter name (PEFT's BufferDict for `trainable_tokens_original`)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers


def _embed_scale(base: nn.Module) -> Optional[torch.Tensor]:
    """A scalar `embed_scale` of scaled embeddings (Gemma's), which PEFT applies after its own lookup."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    return scale if isinstance(scale, torch.Tensor) and scale.numel() == 1 else None


class TrainableTokensLayer(nn.Module):
    """PEFT's `token_adapter`: the base layer and, per adapter, its token indices, trainable rows and the original
    rows (to unmerge). A tied layer holds the dicts of the layer it is tied to, not copies."""

    def __init__(self, base_layer: nn.Module, tied: Optional["TrainableTokensLayer"] = None):
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied] if tied is not None else []  # in a list: not a submodule
        self.trainable_tokens_delta = tied.trainable_tokens_delta if tied is not None else nn.ParameterDict()
        self.trainable_tokens_original = tied.trainable_tokens_original if tied is not None else _Buffers()
        self.token_indices: dict[str, list[int]] = tied.token_indices if tied is not None else {}
        self.merged_adapters: list[str] = []
        self._tables: dict = {}  # (adapter, device) -> (indices, token -> row table, rows fit the fast lookup)

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        return self._tied[0] if self._tied else None

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(self, name: str, indices: list[int], autocast_adapter_dtype: bool = True) -> None:
        self._tables.clear()
        if self.tied_adapter is not None:  # it follows the rows of the layer it is tied to
            return
        weight = self.base_layer.weight
        rows = weight.detach()[torch.tensor(indices, dtype=torch.long, device=weight.device)].clone()
        if autocast_adapter_dtype and rows.dtype in _UPCAST:
            rows = rows.float()
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(rows.clone())
        self.trainable_tokens_original[name] = rows

    def delete_adapter(self, name: str) -> None:
        self._tables.clear()
        if self.tied_adapter is None:
            for container in (self.trainable_tokens_delta, self.trainable_tokens_original, self.token_indices):
                if name in container:
                    del container[name]

    def _table(self, name: str, device: torch.device):
        key = (name, device)
        if key not in self._tables:
            indices = self.token_indices[name]
            index = torch.tensor(indices, dtype=torch.long, device=device)
            lookup = torch.full((self.base_layer.weight.shape[0],), -1, dtype=torch.long, device=device)
            lookup[index] = torch.arange(len(indices), device=device)
            base = self.base_layer
            # F.embedding's own rules (no gradient for the padding row, max_norm's renorm, ...) need the patched table.
            fast = not isinstance(base, nn.Embedding) or (
                base.padding_idx not in indices and base.max_norm is None and not base.scale_grad_by_freq
                and not base.sparse)
            self._tables[key] = (index, lookup, fast)
        return self._tables[key]

    def patched_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight with these adapters' rows in place (a new tensor; the base is not changed)."""
        weight = self.base_layer.weight
        for name in names:
            weight = weight.index_copy(0, self._table(name, weight.device)[0],
                                       self.trainable_tokens_delta[name].to(weight))
        return weight

    def forward_adapter(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The base layer's output with adapter `name`'s rows in place of the base rows."""
        base, weight = self.base_layer, self.base_layer.weight
        delta = self.trainable_tokens_delta[name].to(weight)  # as PEFT: computed in the weight's dtype
        index, lookup, fast = self._table(name, weight.device)
        if isinstance(base, nn.Embedding):
            if fast:
                out = F.embedding(x, weight, base.padding_idx)
                row = lookup[x]
                out = torch.where((row >= 0).unsqueeze(-1), F.embedding(row.clamp(min=0), delta), out)
            else:
                out = F.embedding(x, self.patched_weight([name]), base.padding_idx, base.max_norm, base.norm_type,
                                  base.scale_grad_by_freq, base.sparse)
            scale = _embed_scale(base)
            return out if scale is None else out * scale.to(out.dtype)
        out = F.linear(x, weight, base.bias)
        columns = F.linear(x, delta, None if base.bias is None else base.bias[index])
        return out.index_copy(out.dim() - 1, index, columns)

    def check_overlap(self, names: list[str]) -> None:
        """PEFT's rule: adapters whose rows are in the weight together (merged, or being merged) must not share a
        token."""
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + names):
            rows = set(self.token_indices[name])
            if seen & rows:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in undefined "
                                 "merging behavior. Only disjunct token indices are currently supported.")
            seen |= rows

    def check_merge(self, names: list[str], safe_merge: bool) -> None:
        """Raise what merging `names` would raise, without changing the base (safe_merge: on a copy, as PEFT)."""
        self.check_overlap(names)
        if safe_merge:
            with torch.no_grad():
                weight = self.base_layer.weight.detach()
                for name in names:
                    weight = weight.index_copy(0, self._table(name, weight.device)[0],
                                               self.trainable_tokens_delta[name].to(weight))
                    if not torch.isfinite(weight).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be "
                                         "broken")

    def merge(self, names: list[str]) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            for name in names:
                weight.index_copy_(0, self._table(name, weight.device)[0], self.trainable_tokens_delta[name].to(weight))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.index_copy_(0, self._table(name, weight.device)[0],
                                   self.trainable_tokens_original[name].to(weight))

    def _apply(self, fn, recurse=True):
        self._tables.clear()  # tables follow the weight's device
        return super()._apply(fn, recurse)


class TrainableTokensWrapper(ModulesToSaveWrapper):
    """PEFT's TrainableTokensWrapper: the wrapped layer with one adapter's trainable rows at a time."""

    def __init__(self, module: nn.Module, adapter_name: str, token_indices: list[int],
                 tied: Optional[TrainableTokensLayer] = None, autocast_adapter_dtype: bool = True):
        nn.Module.__init__(self)  # not ModulesToSaveWrapper's: there is no module copy
        self.token_adapter = TrainableTokensLayer(module, tied)
        self._names: list[str] = []
        self._active_adapter = [adapter_name]
        self._disable_adapters = False
        self.update(adapter_name, token_indices, autocast_adapter_dtype)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def tied(self) -> bool:
        return self.token_adapter.tied_adapter is not None

    @property
    def modules_to_save(self) -> dict[str, nn.Module]:
        """Each adapter's trainable rows, as a module (how the shared machinery finds adapter parameters)."""
        deltas = self.token_adapter.trainable_tokens_delta
        return {n: nn.ParameterList([deltas[n]]) for n in self._names if n in deltas}

    @property
    def merged(self) -> bool:
        return self.token_adapter.merged

    @property
    def merged_adapters(self) -> list[str]:
        return self.token_adapter.merged_adapters

    def update(self, adapter_name: str, token_indices: Optional[list[int]] = None,
               autocast_adapter_dtype: bool = True) -> None:
        if token_indices is None:  # a modules_to_save entry naming this layer
            raise ValueError(f"A layer with trainable tokens cannot also be in modules_to_save (adapter "
                             f"{adapter_name!r}): train its tokens or the whole layer, not both.")
        if adapter_name not in self._names:
            self.token_adapter.update_layer(adapter_name, token_indices, autocast_adapter_dtype)
            self._names.append(adapter_name)
        self._set_grads()

    def remove(self, adapter_name: str, active: list[str]) -> None:
        """Undo `update` (a failed add): forget the adapter and restore the active ones."""
        if adapter_name in self._names:
            self._names.remove(adapter_name)
        self.token_adapter.delete_adapter(adapter_name)
        self._active_adapter = [n for n in active if n in self._names]

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else [n for n in adapter_names if n in self._names]
        if len(names) > 1:
            raise ValueError(f"Only one adapter can be set at a time for trainable tokens, got {names}.")
        if names and names[0] not in self._names:
            raise ValueError(f"Adapter {names[0]} not found in {self._names}")
        self._active_adapter = names
        self._set_grads(inference_mode)

    def _set_grads(self, inference_mode: bool = False) -> None:
        if self.tied:  # the rows are the embedding's: its wrapper decides
            return
        for name, p in self.token_adapter.trainable_tokens_delta.items():
            p.requires_grad_(name in self._active_adapter and not inference_mode and not self._disable_adapters)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        self._set_grads()

    def delete_adapter(self, adapter_name: str, new_active: Optional[list[str]]) -> None:
        """As ModulesToSaveWrapper: follow the model's new active adapter when held here, else none."""
        if adapter_name not in self._names:
            return
        self._names.remove(adapter_name)
        self.token_adapter.delete_adapter(adapter_name)
        follow = (new_active or [None])[0]
        if follow is None or follow not in self._names:
            self._active_adapter = []
        elif self._active_adapter[:1] != [follow]:
            self.set_adapter(follow)
        else:
            self._active_adapter = [follow]

    # --- merging (the tuner model calls these with the layers' merges, see merge_plan) -----------------------------
    def pending(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = self._active_adapter if adapter_names is None else adapter_names
        return [n for n in names if n in self._names and n not in self.merged_adapters]

    def unmerge(self) -> None:
        self.token_adapter.unmerge()

    def unload(self) -> nn.Module:
        return self.token_adapter.base_layer

    # --- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            adapter_names = batch_for(self)
        layer = self.token_adapter
        if self._disable_adapters or (not self._active_adapter and adapter_names is None):
            if layer.merged:  # as PEFT: no adapter in use puts the original rows back
                layer.unmerge()
            return layer.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            check_adapter_names(x, adapter_names)
            if layer.merged:
                raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                                 "`unmerge_adapter` first.")
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if layer.merged:
            return layer.base_layer(x, *args, **kwargs)
        return layer.forward_adapter(x, self._active_adapter[0])

    # Rows split by name in Python, which torch.compile would guard on (a recompile per new mix): run eagerly.
    @torch.compiler.disable
    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each sample through its adapter's rows; samples of adapters without rows here (and "__base__") through
        the base layer."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            groups.setdefault(name if name in self._names else BASE_NAME, []).append(i)

        def run(name: str, t: torch.Tensor) -> torch.Tensor:
            if name == BASE_NAME:
                return self.token_adapter.base_layer(t, *args, **kwargs)
            return self.token_adapter.forward_adapter(t, name)

        if len(groups) == 1:
            return run(next(iter(groups)), x)
        order = torch.tensor([i for rows in groups.values() for i in rows], device=x.device)
        out = torch.cat([run(n, x[torch.tensor(rows, device=x.device)]) for n, rows in groups.items()])
        return out[torch.argsort(order)]

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            pass
        if "_modules" not in self.__dict__ or "token_adapter" not in self.__dict__["_modules"]:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        layer = self.__dict__["_modules"]["token_adapter"]
        if name == "weight" and not self._disable_adapters and self._active_adapter and not layer.merged:
            return layer.patched_weight(self._active_adapter)  # as PEFT: what the layer computes with
        return getattr(layer.base_layer, name)


def token_wrappers(model: nn.Module) -> list[tuple[str, TrainableTokensWrapper]]:
    return [(k, m) for k, m in model.named_modules() if isinstance(m, TrainableTokensWrapper)]


def merge_plan(model: nn.Module, adapter_names: Optional[list[str]], safe_merge: bool):
    """Check a merge of the trainable tokens (overlaps, and with safe_merge non-finite rows) and return the step
    that writes it, so that the caller changes nothing when a check fails."""
    todo = []
    for _, wrapper in token_wrappers(model):
        names = wrapper.pending(adapter_names)
        if names:
            wrapper.token_adapter.check_merge(names, safe_merge)
            todo.append((wrapper, names))

    def write() -> None:
        for wrapper, names in todo:
            wrapper.token_adapter.merge(names)
    return write
