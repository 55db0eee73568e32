"""Mixed batches (`adapter_names=`) holding DoRA adapters beside LoRA ones, which PEFT refuses ("Cannot pass
`adapter_names` when DoRA is enabled"): each sample against PEFT running its adapter alone, "__base__" exact,
gradients through the per-adapter loop, and the stacked scales following the magnitudes."""
import pytest
import torch

from tiny_models import (AGAINST_PEFT, add_both, assert_close, base_model, impl, inputs, make_pair, out,
                         peft_fast_only, perturb_magnitudes)
from switches import use_settings

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="PEFT refuses adapter_names with DoRA")

MIXED = [("d1", {"use_dora": True}), ("d2", {"use_dora": True, "r": 2, "lora_alpha": 5, "use_rslora": True}),
         ("l", {"r": 3})]
NAMES = ["d1", "__base__", "l", "d2", "d1", "d2", "l"]


def _mixed_models(kind):
    (n0, kw0), *rest = MIXED
    _, r, i = make_pair(kind, adapter_name=n0, **kw0)
    for k, (n, kw) in enumerate(rest):
        add_both(r, i, n, kind, seed=20 + k, **kw)
    assert perturb_magnitudes(r, i) > 0  # fresh magnitudes give m / norm = 1: the scale would go untested
    r.eval()
    i.eval()
    return r, i


def _alone(r, kind, x, names):
    """Each sample through PEFT with its adapter alone (base: adapters disabled), in the batch's order."""
    rows = []
    key = "X" if kind == "mlp" else "input_ids"
    for k, name in enumerate(names):
        xi = {key: x[key][k:k + 1]}
        if name == "__base__":
            with r.disable_adapter():
                rows.append(out(r, xi))
        else:
            r.set_adapter(name)
            rows.append(out(r, xi))
    return torch.cat(rows)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "mlp"])
def test_mixed_batch_dora_and_lora_per_sample(kind, backend, monkeypatch):
    if backend == "triton":
        from peft_fast.kernels import interpreting

        if not (interpreting() or torch.cuda.is_available()):
            pytest.skip("no Triton device")
        use_settings(monkeypatch, backend="triton")
    r, i = _mixed_models(kind)
    x = inputs(kind, batch=len(NAMES), seq=4, seed=7)
    with torch.no_grad():
        got = out(i, x, adapter_names=NAMES)
        expected = _alone(r, kind, x, NAMES)
        assert_close(got, expected, atol=2e-5, rtol=2e-5)
        with i.disable_adapter():
            base = out(i, x)
    assert torch.equal(got[1], base[1])  # __base__ is exact
    assert all(not torch.allclose(got[k], base[k], atol=1e-4) for k in range(len(NAMES)) if NAMES[k] != "__base__")


def test_mixed_batch_with_grad_matches_each_adapter_alone():
    """With autograd on, the per-adapter loop: the output and every adapter's gradients (A, B, magnitude) are those
    of running each adapter alone on its own samples."""
    kind = "mlp"
    r, i = _mixed_models(kind)
    x = inputs(kind, batch=len(NAMES), seed=8)
    for n, p in i.named_parameters():
        if "lora_" in n:  # train every adapter at once (set_adapter would leave only the active one trainable)
            p.requires_grad_(True)
    y = out(i, x, adapter_names=NAMES)
    y.pow(2).sum().backward()
    for name in ("d1", "d2", "l"):
        rows = [k for k, n in enumerate(NAMES) if n == name]
        r.set_adapter(name)
        r.zero_grad()
        y_r = out(r, {"X": x["X"][rows]})
        assert_close(y[rows], y_r, atol=2e-5, rtol=2e-5)
        y_r.pow(2).sum().backward()
        for n, p in r.named_parameters():
            if f".{name}." in n and p.grad is not None:
                ip = dict(i.named_parameters())[n]
                assert ip.grad is not None and ip.grad.abs().sum() > 0, n
                assert_close(ip.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_mixed_batch_cache_follows_magnitude():
    r, i = _mixed_models("mlp")
    x = inputs("mlp", batch=len(NAMES), seed=9)
    with torch.no_grad():
        first = out(i, x, adapter_names=NAMES)
        for model in (r, i):
            dict(model.named_parameters())["base_model.model.lin1.lora_magnitude_vector.d2.weight"].mul_(1.3)
        # In eval mode the mixed-batch stacks follow the layers' events, not every parameter's version (what a
        # served or compiled forward can afford): an edit by hand is seen after the next eval(), as the README says.
        i.eval()
        second = out(i, x, adapter_names=NAMES)
        assert_close(second, _alone(r, "mlp", x, NAMES), atol=2e-5, rtol=2e-5)
    assert not torch.allclose(first[3], second[3], atol=1e-4)
    assert torch.equal(first[0], second[0])  # d1 untouched


@peft_fast_only
def test_a_mixed_batch_refused_on_a_merged_model_leaves_no_stale_dora_slot():
    """A mixed call while an adapter is merged is refused before the stacks are readied: DoRA slots made from the
    merged base weight would otherwise serve mixed batches after the unmerge (the merge restores the weight's
    values, so the slots' signatures do not change)."""
    x = inputs("llama", batch=3)
    names = ["default", "b", "__base__"]

    def model():
        base = base_model("llama")  # (built, on the first call, before the adapters' seed)
        torch.manual_seed(0)
        m = impl.get_peft_model(base, impl.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
        torch.manual_seed(1)
        m.add_adapter("b", impl.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                           use_dora=True))
        return m.eval()

    with torch.no_grad():
        want = model()(**x, adapter_names=names).logits
        m = model()
        m.merge_adapter(["default"])
        with pytest.raises(ValueError, match="merged adapters"):
            m(**x, adapter_names=names)
        m.unmerge_adapter()
        assert_close(m(**x, adapter_names=names).logits, want, atol=1e-5, rtol=1e-5)
