"""How peft_fast computes AdaLoRA (peft_fast-only guarantees): the delta never formed as an [out, in] matrix (a
Conv2d's as two thin convolutions), inference over the kept ranks only, scaled and cached until A, E, B or ranknum
change, the cache dropped by the layer's events, LoRA's fused Triton op on a dense base (run here under the
interpreter)."""
import copy
import pickle

import pytest
import torch
from oft_adalora_pairs import pair, x_for
from switches import use_settings
from tiny_models import AGAINST_PEFT, assert_close, count_calls, out

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's own computation")

from peft_fast.tuners.adalora import compute  # noqa: E402
from peft_fast.tuners.adalora.layer import AdaLoraLayer  # noqa: E402


def _prune(model, keep: int = 2) -> None:
    """Zero E beyond the first `keep` ranks of every layer, as the allocator masks them."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_E." in n:
                p[keep:] = 0


def test_no_delta_weight_is_formed(monkeypatch):
    """Training and inference run B·((A ⊙ E)·x); get_delta_weight (B·(A ⊙ E), [out, in]) is for merging only."""
    calls = count_calls(monkeypatch, AdaLoraLayer, "get_delta_weight")
    for kind in ("llama", "conv"):
        _, r, i = pair("adalora", kind)
        x = x_for(kind)
        i.train()
        out(i, x).pow(2).mean().backward()
        i.eval()
        with torch.no_grad():
            assert_close(out(i, x), (r.eval(), out(r, x))[1])
    assert not calls


def test_inference_uses_the_kept_ranks_only():
    _, r, i = pair("adalora", "llama")
    for m in (r, i):
        _prune(m)
        m.eval()
    x = x_for("llama")
    with torch.no_grad():
        assert_close(out(i, x), out(r, x))
    layer = i.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer._values["default"][1]
    assert a.shape[0] == b.shape[1] == 2


def test_inference_cache_follows_the_parameters():
    """An optimizer-style step, a `.data` swap, the allocator's masking (in place on E), a new ranknum: seen at
    the next call."""
    _, r, i = pair("adalora", "llama")
    x = x_for("llama")
    for m in (r, i):
        m.eval()

    def q(m):
        return m.base_model.model.model.layers[0].self_attn.q_proj

    with torch.no_grad():
        out(i, x)
        for edit in (lambda m: q(m).lora_A["default"].add_(0.1),
                     lambda m: setattr(q(m).lora_B["default"], "data", q(m).lora_B["default"].data * 2),
                     lambda m: q(m).lora_E["default"].masked_fill_(torch.arange(6).view(6, 1) < 3, 0.0),
                     lambda m: q(m).ranknum["default"].fill_(3.0)):
            edit(r), edit(i)
            assert_close(out(i, x), out(r, x))


def test_layer_events_drop_the_cache():
    _, _, i = pair("adalora", "mlp")
    layer = i.base_model.model.lin0
    x = x_for("mlp")
    for event in (lambda: i.set_adapter("default"), lambda: i.train(), lambda: i.eval(),
                  lambda: (i.merge_adapter(), i.unmerge_adapter()), lambda: i.float()):
        i.eval()
        with torch.no_grad():
            out(i, x)
        assert layer._values
        event()
        assert not layer._values
    i.eval()
    with torch.no_grad():
        out(i, x)
    for copied in (copy.deepcopy(i), pickle.loads(pickle.dumps(i))):
        assert not copied.base_model.model.lin0._values


def test_conv_delta_runs_as_two_thin_convolutions(monkeypatch):
    """conv(x, A ⊙ E) with r output channels, then a 1x1 convolution with s·B: no [out, in, k, k] kernel."""
    seen = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(compute.F, "conv2d", lambda x, w, *a, **k: seen.append(tuple(w.shape)) or real(x, w, *a, **k))
    _, r, i = pair("adalora", "conv", target_modules=["conv0"])
    i.train()
    out(i, x_for("conv"))
    assert seen[:3] == [(8, 3, 3, 3), (6, 3, 3, 3), (8, 6, 1, 1)]  # conv0's base, then its delta
    assert seen.count((8, 3, 3, 3)) == 1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_op_on_the_triton_kernels(monkeypatch, mode):
    """One adapter over a dense base runs LoRA's fused op (A ⊙ E as its A), in training with the scale as a float
    read once per ranknum value, in eval with the cached kept ranks."""
    from peft_fast import kernels

    if not kernels.HAS_TRITON:
        pytest.skip("Triton is not installed")
    _, r, i = pair("adalora", "mlp")
    calls = count_calls(monkeypatch, compute, "lora_linear_triton")
    use_settings(monkeypatch, backend="triton")  # CPU tensors run under the Triton interpreter
    x = x_for("mlp")
    for m in (r, i):
        m.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        assert_close(out(i, x), out(r, x), atol=1e-4, rtol=1e-4)
    assert len(calls) == 2  # lin0 and lin1
    if mode == "train":
        out(i, x).pow(2).mean().backward()
        out(r, x).pow(2).mean().backward()
        for (n, p), q in zip(r.named_parameters(), i.parameters()):
            if p.requires_grad and ".ranknum." not in n:
                assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=n)
