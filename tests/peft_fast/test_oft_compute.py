"""How peft_fast computes OFT (peft_fast-only guarantees): PEFT's rotation matrices; each adapter's rotation formed
once per call, never per token; the folded weight (one matmul) outside training, cached until an adapter weight or
the base weight changes and dropped by the layer's events; the weight folded in forward when there are more tokens
than output features in training, with PEFT's gradients."""
import copy
import pickle

import pytest
import torch
from oft_adalora_pairs import OFTConfig, build, cfg, pair, x_for
from tiny_models import AGAINST_PEFT, assert_close, base_model, out

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's own computation")

from peft_fast.tuners.oft import forward, rotation  # noqa: E402
from peft_fast.tuners.oft.layer import OFTLayer  # noqa: E402


def _spy(monkeypatch, name: str) -> list:
    calls, real = [], getattr(forward, name)
    monkeypatch.setattr(forward, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("terms", range(1, 9))
@pytest.mark.parametrize("block", [1, 2, 8, 32])
def test_rotation_is_peft_rotation(terms, block):
    """Neumann series of every length (PEFT forms the powers one by one, peft_fast nests them in Q²), and the exact
    Cayley transform (an inverse where PEFT solves), against PEFT's own _cayley_batch on the same weights."""
    _, r, i = pair("oft", "mlp", oft_block_size=block, num_cayley_neumann_terms=terms, init_weights=True)
    theirs, ours = r.base_model.model.lin1.oft_R["default"], i.base_model.model.lin1.oft_R["default"]
    for neumann in (True, False):
        ours.use_cayley_neumann = neumann
        want = theirs._cayley_batch(theirs.weight, block, neumann, terms)
        assert_close(rotation.rotation(ours), want, atol=1e-6, rtol=1e-5, msg=f"neumann={neumann}")
    assert torch.equal(rotation.skew(ours, ours.weight), theirs._pytorch_skew_symmetric(theirs.weight, block))


@pytest.mark.parametrize("tokens", [1, 64])
def test_rotation_formed_once_per_adapter_and_call(monkeypatch, tokens):
    _, _, i = pair("oft", "llama")
    calls = _spy(monkeypatch, "rotation")
    x = {"input_ids": torch.randint(1, 128, (1, tokens))}
    i.train()
    out(i, x).sum().backward()
    layers = [m for m in i.modules() if isinstance(m, OFTLayer)]
    assert len(calls) == len(layers)


def test_eval_folds_the_rotation_into_one_matmul(monkeypatch):
    """x·(W·diag(R)ᵀ)ᵀ: the base module's own forward is not called, and the fold is computed once; with a hook on
    the base the module runs (the hook must see its call), with the same outputs."""
    _, r, i = pair("oft", "mlp")
    x = x_for("mlp")
    for m in (r, i):
        m.eval()
    layer = i.base_model.model.lin0
    base_calls, fold_calls = [], _spy(monkeypatch, "fold")
    layer.base_layer.register_forward_pre_hook(lambda *a: base_calls.append(1))
    with torch.no_grad():
        want = out(r, x)
        assert_close(out(i, x), want)
        assert len(base_calls) == 1 and len(fold_calls) == 1  # lin1 folded; lin0 (hooked) rotates its input
        assert_close(out(i, x), want)
        assert len(base_calls) == 2 and len(fold_calls) == 1  # cached
    _, r, i = pair("oft", "mlp")
    base_calls.clear()
    i.eval()
    with torch.no_grad():
        out(i, x)
    assert not base_calls


def test_eval_cache_follows_the_parameters():
    """An optimizer-style in-place step, a `.data` swap, an edit of the base weight, COFT's projection: seen at the
    next call."""
    _, r, i = pair("oft", "mlp")
    x = x_for("mlp")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        out(i, x)
        for edit in (lambda m: m.base_model.model.lin0.oft_R["default"].weight.add_(0.01),
                     lambda m: setattr(m.base_model.model.lin1.oft_R["default"].weight, "data",
                                       m.base_model.model.lin1.oft_R["default"].weight.data * 0.9),
                     lambda m: m.base_model.model.lin0.base_layer.weight.mul_(1.1)):
            edit(r), edit(i)
            assert_close(out(i, x), out(r, x))
    _, r, i = pair("oft", "mlp", coft=True, eps=1e-4)
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        assert_close(out(i, x), out(r, x))
        assert_close(out(i, x), out(r, x))
        assert torch.equal(i.base_model.model.lin0.oft_R["default"].weight,
                           r.base_model.model.lin0.oft_R["default"].weight)  # projected in place, as PEFT


def test_layer_events_drop_the_cache():
    _, _, i = pair("oft", "mlp")
    layer = i.base_model.model.lin0
    x = x_for("mlp")
    i.eval()
    for event in (lambda: i.set_adapter("default"), lambda: i.train(), lambda: i.eval(),
                  lambda: (i.merge_adapter(), i.unmerge_adapter()), lambda: i.float()):
        with torch.no_grad():
            i.eval()
            out(i, x)
        assert layer._values
        event()
        assert not layer._values
    i.eval()
    with torch.no_grad():
        out(i, x)
    for copied in (copy.deepcopy(i), pickle.loads(pickle.dumps(i))):
        assert not copied.base_model.model.lin0._values


def test_training_folds_the_weight_when_tokens_outnumber_outputs(monkeypatch):
    """More tokens than output features: FoldedLinear (W·diag(R)ᵀ in forward, the rotation's backward); fewer:
    the rotated input. Both give PEFT's loss and gradients."""
    real = rotation.FoldedLinear.apply
    folded = []
    monkeypatch.setattr(rotation.FoldedLinear, "apply", lambda *a: folded.append(1) or real(*a))
    for batch, expect in ((64, True), (4, False)):  # lin0: 16 -> 32 features
        _, r, i = pair("oft", "mlp", target_modules=["lin0"])
        x = {"X": torch.randn(batch, 16, generator=torch.Generator().manual_seed(batch))}
        folded.clear()
        for m in (r, i):
            m.train()
            m.zero_grad()
            out(m, x).pow(2).mean().backward()
        assert bool(folded) == expect
        assert_close(out(i, x), out(r, x))
        for (n, p), q in zip(r.named_parameters(), i.parameters()):
            if p.requires_grad:
                assert_close(q.grad, p.grad, msg=n)


def test_eval_with_gradients_trains_the_blocks():
    """In eval mode with gradients wanted nothing is cached and the blocks get PEFT's gradients."""
    _, r, i = pair("oft", "llama")
    x = x_for("llama")
    for m in (r, i):
        m.eval()
        out(m, x).pow(2).mean().backward()
    layer = i.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer._values
    assert_close(layer.oft_R["default"].weight.grad,
                 r.base_model.model.model.layers[0].self_attn.q_proj.oft_R["default"].weight.grad)


def test_16bit_input_is_rotated_in_float32_and_rounded_as_peft(monkeypatch):
    """A bf16 base is never folded into (rounding W·diag(R)ᵀ to bf16 is not PEFT's rounding of the input)."""
    base = base_model("llama").to(torch.bfloat16)
    _, r, i = build("oft", "llama", base=base)
    folds = _spy(monkeypatch, "fold")
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        assert torch.equal(out(i, x), out(r, x))
    assert not folds


def test_block_share_and_the_rotation_dtype():
    _, r, i = pair("oft", "llama", block_share=True, oft_block_size=16)
    assert i.base_model.model.model.layers[0].self_attn.q_proj.oft_R["default"].weight.shape == (1, 120)
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        assert_close(out(i, x), out(r, x))
    config = cfg("oft", "llama")
    assert OFTConfig(**config).num_cayley_neumann_terms == 5


def test_embedding_table_folded_in_eval(monkeypatch):
    """An embedding's rows rotated once into a cached table (one lookup per call, the module not called), except
    with max_norm, whose lookup renormalizes the table in place: there the module runs and the rows are rotated."""
    _, r, i = pair("oft", "llama", target_modules=["embed_tokens"])
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    layer = i.base_model.model.model.embed_tokens
    calls = []
    monkeypatch.setattr(type(layer.base_layer), "forward",
                        lambda self, *a, real=type(layer.base_layer).forward: calls.append(1) or real(self, *a))
    with torch.no_grad():
        assert_close(out(i, x), out(r, x))
        assert_close(out(i, x), out(r, x))
    assert len(calls) == 2 and layer._values  # PEFT's two calls only: peft_fast looked up its cached table
    layer.base_layer.max_norm = 100.0
    r.base_model.model.model.embed_tokens.base_layer.max_norm = 100.0
    i.eval()
    with torch.no_grad():
        assert_close(out(i, x), out(r, x))
    assert len(calls) == 4
