"""Merge checks shared by the LoRA Embedding and Conv parity tests: one merge round trip compared with PEFT step by
step, and add_weighted_adapter's types and merged deltas."""
from __future__ import annotations

from tiny_models import assert_close, assert_same_state


def check_merge_round_trip(r, i, x, out):
    """PEFT's model `r` and the implementation's `i` (adapters "default" and "other", eval mode, no grad): merged,
    unmerged, both adapters merged safely, unmerged, with equal states and PEFT's outputs (`out(model, x)`) at each
    step; then merge_and_unload of "other" (safe). Returns the two unloaded models."""
    want = out(r, x)
    for m in (r, i):
        m.merge_adapter()
    assert_same_state(r, i)
    assert_close(out(i, x), want)
    for m in (r, i):
        m.unmerge_adapter()
    assert_same_state(r, i)
    assert_close(out(i, x), want)
    for m in (r, i):
        m.merge_adapter(adapter_names=["default", "other"], safe_merge=True)
    assert_same_state(r, i)
    for m in (r, i):
        m.unmerge_adapter()
    merged_r = r.merge_and_unload(adapter_names=["other"], safe_merge=True)
    merged_i = i.merge_and_unload(adapter_names=["other"], safe_merge=True)
    assert_same_state(merged_r, merged_i)
    return merged_r, merged_i


# add_weighted_adapter's combination types that the embedding and convolution tests compare with PEFT
WEIGHTED_TYPES = ["cat", "linear", "ties", "dare_ties", "magnitude_prune", "svd", "ties_svd", "dare_linear_svd",
                  "magnitude_prune_svd"]


def merged_deltas(model, name: str = "merged") -> dict:
    """Per adapter layer holding `name`, its delta (get_delta_weight, in the layer's own orientation)."""
    return {n: m.get_delta_weight(name) for n, m in model.named_modules() if hasattr(m, "r") and name in m.r}
