"""torch.func transforms (vmap, grad, per-sample gradients through functional_call) over adapter models, as PEFT's
plain torch layers allow: the Triton ops step aside for the references inside them, and DoRA's eval cache keeps
nothing made from transformed tensors."""
import pytest
import torch
from torch.func import functional_call, grad, vmap

from switches import use_settings
from tiny_models import assert_close, inputs, make_dora_pair, make_pair


def _backends():
    from peft_fast.kernels import interpreting

    return ["torch"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])


def _per_sample_grads(model, x):
    params = {n: p.detach() for n, p in model.named_parameters()}
    trained = {n: params[n] for n, p in model.named_parameters() if p.requires_grad}

    def loss(tr, xi):
        return functional_call(model, {**params, **tr}, (xi.unsqueeze(0),)).pow(2).sum()

    return vmap(grad(loss), in_dims=(None, 0))(trained, x)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vmap_and_per_sample_grads_match_peft(monkeypatch, backend, dora, mode):
    _, r, i = (make_dora_pair if dora else make_pair)("mlp")
    use_settings(monkeypatch, backend=backend)
    x = inputs("mlp", batch=4)["X"]
    for model in (r, i):
        getattr(model, mode)()
    with torch.no_grad():
        model_out = {m: vmap(lambda xi, m=m: m(xi.unsqueeze(0)).squeeze(0))(x) for m in (r, i)}
    assert_close(model_out[i], model_out[r])
    assert_close(model_out[i], i(x).detach())
    want, got = _per_sample_grads(r, x), _per_sample_grads(i, x)
    assert set(got) == set(want) and want
    for n in want:
        assert got[n].shape[0] == 4
        assert_close(got[n], want[n], atol=1e-4, rtol=1e-4, msg=n)
    if mode == "eval":  # the eval cache still serves, and gradients flow, after the transforms
        i(x).sum().backward()


def _tuned(lib, name, **kw):
    from tiny_models import TinyMLP

    torch.manual_seed(0)
    cfg = getattr(lib, name)(target_modules=["lin0", "lin1"], **kw)
    model = lib.get_peft_model(TinyMLP(), cfg)
    with torch.no_grad():  # every adapter tensor off its initial value, the same in both libraries
        g = torch.Generator().manual_seed(1)
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


CONFIGS = [("LoraConfig", {"r": 2}), ("LoraConfig", {"r": 2, "use_dora": True}), ("LoKrConfig", {"r": 2}),
           ("VeraConfig", {"r": 4}), ("IA3Config", {"feedforward_modules": ["lin1"]})]


@pytest.mark.parametrize("name, kw", CONFIGS, ids=[f"{n}-{kw}" for n, kw in CONFIGS])
def test_ensembles_and_forward_mode_match_peft(name, kw):
    """vmap over stacked adapter parameters (model ensembling) and jvp in them, in eval mode: no cache keyed on
    storage, no in-place step; DoRA's magnitude carries its tangent."""
    from tiny_models import impl, ref
    from torch.func import jvp

    x = inputs("mlp", batch=3)["X"]
    results = {}
    for lib in (ref, impl):
        model = _tuned(lib, name, **kw)
        params = {n: p.detach() for n, p in model.named_parameters()}
        trained = {n: params[n] for n, p in model.named_parameters() if p.requires_grad}
        stacked = {n: torch.stack([t, 1.5 * t]) for n, t in trained.items()}

        def run(tr, model=model, params=params):
            return functional_call(model, {**params, **tr}, (x,))

        tangents = {n: torch.ones_like(t) for n, t in trained.items()}
        with torch.no_grad():
            results[lib] = (vmap(run)(stacked), jvp(run, (trained,), (tangents,))[1])
    for got, want in zip(results[impl], results[ref]):
        assert_close(got, want, atol=1e-5, rtol=1e-4)
