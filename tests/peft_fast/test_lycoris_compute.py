"""How peft_fast computes LoHa and LoKr (peft_fast-only guarantees): ΔW formed once per call, never per token,
folded into the base matmul where that is exact, cached outside training until a factor, a scaling or the base
changes, and the cache dropped by the layer's events. Also: the shared planner plans their convolutions."""
import copy
import pickle

import pytest
import torch
from torch import nn
from lycoris_pairs import TUNERS, pair, x_for
from tiny_models import AGAINST_PEFT, assert_close, base_model, out

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's own computation")

from peft_fast.tuners import injection  # noqa: E402
from peft_fast.tuners.lycoris import forward  # noqa: E402
from peft_fast.tuners.loha import LoHaLayer, LoHaModel  # noqa: E402
from peft_fast.tuners.lokr import LoKrLayer  # noqa: E402

LAYERS = {"loha": LoHaLayer, "lokr": LoKrLayer}
TUNER_IDS = ["loha", "lokr"]


def _count(monkeypatch, cls, name):
    calls = []
    real = getattr(cls, name)

    def spy(self, *a, **k):
        calls.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(cls, name, spy)
    return calls


def _layers(model):
    return [m for m in model.modules() if isinstance(m, tuple(LAYERS.values()))]


@pytest.mark.parametrize("tuner", TUNER_IDS)
@pytest.mark.parametrize("batch", [1, 4])
def test_delta_formed_once_per_adapter_and_call_whatever_the_tokens(monkeypatch, tuner, batch):
    _, _, i = pair(tuner, "llama")
    calls = _count(monkeypatch, LAYERS[tuner], "delta")
    i.train()
    out(i, x_for("llama", batch=batch, seq=8))
    assert len(calls) == len(_layers(i))


@pytest.mark.parametrize("tuner", TUNER_IDS)
def test_float32_plain_bases_run_one_matmul(monkeypatch, tuner):
    """x·(W + ΔW)ᵀ + b: the base module's own forward is not called; with a hook on the base it is (the hook must
    see its call), and the outputs agree."""
    _, _, i = pair(tuner, "mlp")
    base_calls = _count(monkeypatch, nn.Linear, "forward")
    x = x_for("mlp")
    for mode in ("train", "eval"):
        getattr(i, mode)()
        folded = out(i, x)
        adapted = {m.base_layer for m in _layers(i)}
        assert not adapted & set(base_calls), mode
        handle = i.base_model.model.lin0.base_layer.register_forward_hook(lambda *a: None)
        assert_close(out(i, x), folded)
        assert i.base_model.model.lin0.base_layer in base_calls
        handle.remove()
        base_calls.clear()


@pytest.mark.parametrize("tuner", TUNER_IDS)
def test_eval_cache_follows_the_parameters(monkeypatch, tuner):
    """Outside training ΔW is built once; an optimizer-style in-place step, a `.data` swap, a new scaling or an
    edit of the base weight is seen at the next call."""
    _, r, i = pair(tuner, "mlp")
    calls = _count(monkeypatch, LAYERS[tuner], "delta")
    x = x_for("mlp")
    i.eval()
    r.eval()
    n = len(_layers(i))
    with torch.no_grad():
        first = out(i, x)
        assert_close(out(i, x), first)
        assert len(calls) == n  # the second call was served from the cache
        layer = i.base_model.model.lin0
        changes = [
            lambda p: p.add_(0.5),  # bumps the version
            lambda p: setattr(p, "data", p.data * 2),  # same version, new storage
        ]
        factor = {"loha": "hada_w1_b", "lokr": "lokr_w1"}[tuner]
        for change in changes:
            for model in (r, i):
                change(getattr(model.base_model.model.lin0, factor)["default"])
            assert_close(out(i, x), out(r, x))
        before = len(calls)
        for model in (r, i):
            model.base_model.model.lin0.set_scale("default", 0.5)
        assert_close(out(i, x), out(r, x))
        assert len(calls) == before + 1  # only the layer whose scaling changed
        for model in (r, i):
            model.base_model.model.lin1.base_layer.weight.mul_(1.5)
        assert_close(out(i, x), out(r, x))
        assert layer._values


@pytest.mark.parametrize("tuner", TUNER_IDS)
def test_layer_events_drop_the_cache(tuner):
    _, _, i = pair(tuner, "mlp")
    layer = i.base_model.model.lin0
    x = x_for("mlp")

    def filled():
        i.eval()
        with torch.no_grad():
            out(i, x)
        return bool(layer._values)

    events = [lambda: i.set_adapter("default"), lambda: i.train(), lambda: (i.merge_adapter(), i.unmerge_adapter()),
              lambda: i.to("cpu"), lambda: i.base_model.enable_adapter_layers(), lambda: i.eval()]
    for event in events:
        assert filled()
        event()
        assert not layer._values
    assert filled()
    for copied in (copy.deepcopy(i), pickle.loads(pickle.dumps(i))):
        assert not copied.base_model.model.lin0._values
        with torch.no_grad():
            assert_close(out(copied.eval(), x), out(i, x))


@pytest.mark.parametrize("tuner", TUNER_IDS)
def test_eval_mode_with_gradients_trains_the_factors(tuner):
    """In eval mode with gradients wanted nothing is cached: gradients reach the factors (those of a train step
    without dropout)."""
    _, _, i = pair(tuner, "mlp")
    x = x_for("mlp")
    grads = {}
    for mode in ("train", "eval"):
        getattr(i, mode)()
        i.zero_grad()
        out(i, x).pow(2).mean().backward()
        grads[mode] = {n: p.grad.clone() for n, p in i.named_parameters() if p.requires_grad}
        assert not i.base_model.model.lin0._values
    assert grads["train"].keys() == grads["eval"].keys() and grads["eval"]
    for n in grads["train"]:
        assert_close(grads["eval"][n], grads["train"][n], msg=n)


@pytest.mark.parametrize("tuner", TUNER_IDS)
def test_the_shared_planner_asks_the_layer_which_bases_it_adapts(tuner):
    """injection.plan_adapter (get_peft_model, from_pretrained, load_adapter) takes a tuner's convolutions through its
    layer's `view_for`; a tuner whose layers take fewer kinds (IA3: Conv2d and Conv3d, as PEFT) refuses the rest."""
    import peft_fast

    model = pair(tuner, "conv")[0]
    model_cls = type(pair(tuner, "mlp")[2].base_model)
    plan = injection.plan_adapter(model, TUNERS[tuner][1](target_modules=["conv0", "conv2", "head"]), model_cls)
    assert [(t.key, t.in_features, t.out_features) for t in plan.targets] == \
        [("conv0", 3, 8), ("conv2", 12, 8), ("head", 6, 4)]
    ia3 = peft_fast.get_peft_model(base_model("mlp"), peft_fast.IA3Config(target_modules=["lin0"],
                                                                          feedforward_modules=[]))
    with pytest.raises(ValueError, match="conv2 .Conv1d. is not supported"):
        injection.plan_adapter(model, peft_fast.IA3Config(target_modules=["conv2"], feedforward_modules=[]),
                               type(ia3.base_model))
    assert LoHaModel.layer_cls is LoHaLayer


@pytest.mark.parametrize("tuner", TUNER_IDS)
def test_16bit_inputs_get_a_16bit_delta_when_it_pays(monkeypatch, tuner):
    """bf16 x, float32 factors: a 16-bit ΔW for many rows or from the eval cache; PEFT's float32 matmul (x cast up)
    for a few rows without the cache."""
    _, _, i = pair(tuner, "mlp")
    i.to(torch.bfloat16)
    for p in i.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    seen = []
    real = forward.run_op
    monkeypatch.setattr(forward, "run_op", lambda layer, x, w, b: seen.append(w.dtype) or real(layer, x, w, b))
    for mode, rows, want in (("train", 1, torch.float32), ("train", 32, torch.bfloat16), ("eval", 1, torch.bfloat16)):
        getattr(i, mode)()
        seen.clear()
        with torch.set_grad_enabled(mode == "train"):
            y = out(i, {"X": torch.randn(rows, 16, dtype=torch.bfloat16)})
        assert y.dtype == torch.bfloat16 and set(seen) == {want}, (mode, rows)
