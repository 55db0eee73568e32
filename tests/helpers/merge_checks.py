"""One merge round trip, compared with PEFT step by step (shared by the LoRA Embedding and Conv parity tests)."""
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
