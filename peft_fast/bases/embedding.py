"""A base view for torch's nn.Embedding, for the tuners that adapt embeddings (OFT). Not in the shared dispatcher
list (`bases.VIEWS`): such a tuner returns it from its layer's `view_for`, so that the shared merge bookkeeping
reads and writes the table as it does a linear weight. in_features is the embedding dimension (what an adapter on
the layer's output sees), out_features the number of embeddings (the table's rows)."""
from __future__ import annotations

import torch.nn as nn

from .view import BaseView, has_hooks


class EmbeddingView(BaseView):
    """torch.nn.Embedding: weight [num_embeddings, embedding_dim]."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._plain = type(module) is nn.Embedding

    @property
    def in_features(self) -> int:
        return self.module.embedding_dim

    @property
    def out_features(self) -> int:
        return self.module.num_embeddings

    def fused_embedding(self):
        """The module's parameters when its forward is exactly F.embedding with its settings and a table that the
        lookup leaves alone (a plain module without hooks or max_norm, whose renormalization writes into the
        table), so that a lookup in another table may replace it; else None."""
        m = self.module
        if not self._plain or has_hooks(m) or m.max_norm is not None:
            return None
        return m._parameters

    def supports_norms(self) -> bool:
        return False

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)
