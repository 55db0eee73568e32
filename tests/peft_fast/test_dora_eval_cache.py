"""DoRA's eval cache (the scale m / norm, and ||W||² per layer): reused while nothing changed, rebuilt after every
change PEFT would see (optimizer steps, loads, merges, dtype moves, in-place edits once eval() is called again)."""
import pytest
import torch

from tiny_models import (
    AGAINST_PEFT,
    assert_close,
    count_calls,
    dora_layers,
    impl,
    inputs,
    loss_of,
    make_dora_pair,
    out,
    ref,
)

_pair, _layers = make_dora_pair, dora_layers

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's DoRA cache against PEFT's uncached DoRA")


# ------------------------------------------------------------------------------------------------- eval cache
def _norm_calls(monkeypatch):
    import peft_fast.tuners.lora.dora as dora_mod

    return count_calls(monkeypatch, dora_mod, "dora_norm")


def test_eval_cache_reuses_scale_and_follows_every_change(monkeypatch, tmp_path):
    _, r, i = _pair("mlp")
    r.eval()
    i.eval()
    x = inputs("mlp", batch=5)
    calls = _norm_calls(monkeypatch)
    n_layers = len(_layers(i))

    def check(msg):
        with torch.no_grad():
            assert_close(out(i, x), out(r, x), msg=msg)

    check("first")
    assert len(calls) == n_layers
    check("cached")
    assert len(calls) == n_layers  # nothing recomputed while nothing changed
    rp, ip = dict(r.named_parameters()), dict(i.named_parameters())
    key = "base_model.model.lin0.lora_{}.default.weight"
    mag = "base_model.model.lin0.lora_magnitude_vector.default.weight"
    base = "base_model.model.lin1.base_layer.weight"
    prev = out(i, x).detach()

    def changed(msg):
        nonlocal prev
        check(msg)
        now = out(i, x).detach()
        assert not torch.allclose(now, prev, atol=1e-5), f"{msg}: the change did not show"
        prev = now

    with torch.no_grad():
        for p in (rp[mag], ip[mag]):
            p.mul_(1.2)  # in place, as an optimizer step
    changed("magnitude in place")
    with torch.no_grad():
        for p in (rp[key.format("B")], ip[key.format("B")]):
            p.add_(0.3)
    changed("lora_B in place")
    new_a = torch.randn_like(ip[key.format("A")])
    rp[key.format("A")].data = new_a.clone()
    ip[key.format("A")].data = new_a.clone()  # a new storage
    changed("lora_A swapped")
    with torch.no_grad():
        for p in (rp[base], ip[base]):
            p.mul_(0.7)  # the frozen base, changed anyway: ||W||² must follow
    changed("base weight in place")
    # a load over the adapter (PEFT's file format)
    sd = ref.get_peft_model_state_dict(r)
    sd = {k: (v * 0.9 if "magnitude" in k else v) for k, v in sd.items()}
    ref.set_peft_model_state_dict(r, sd)
    impl.set_peft_model_state_dict(i, sd)
    changed("set_peft_model_state_dict")
    r.save_pretrained(tmp_path)
    with torch.no_grad():
        for p in r.parameters():
            if p.requires_grad:
                p.mul_(-1)
    i.load_adapter(str(tmp_path), adapter_name="again")
    i.set_adapter("again")
    r.load_adapter(str(tmp_path), adapter_name="again")
    r.set_adapter("again")
    r.eval()
    i.eval()
    check("load_adapter")
    # a train/eval round trip and a training step
    i.train()
    r.train()
    opt_r = torch.optim.SGD([p for p in r.parameters() if p.requires_grad], lr=0.1)
    opt_i = torch.optim.SGD([p for p in i.parameters() if p.requires_grad], lr=0.1)
    for m, opt in ((r, opt_r), (i, opt_i)):
        loss_of(m, x).backward()
        opt.step()
    r.eval()
    i.eval()
    changed("after a training step")


def test_eval_again_refreshes_after_in_place_data_edits():
    """`.data` edits bump no version counter, so the cache cannot see them; calling eval() again refreshes it."""
    _, r, i = _pair("mlp")
    r.eval()
    i.eval()
    x = inputs("mlp", seed=9)
    with torch.no_grad():
        before = out(r, x)
        assert_close(out(i, x), before)
        for model in (r, i):
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.data.mul_(1.5)
                if name.endswith("base_layer.weight"):
                    p.data.mul_(0.5)
        r.eval()
        i.eval()
        want = out(r, x)
        assert not torch.allclose(want, before, atol=1e-3)  # the edits matter
        assert_close(out(i, x), want)
