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
