"""DoRA (use_dora=True) against Hugging Face PEFT's DoRA: outputs, gradients of A, B and the magnitude, merged
weights, files both ways and the eval cache's staleness handling (mixed batches: test_dora_mixed_batch.py)."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import (
    AGAINST_PEFT,
    add_both,
    assert_close,
    copy_weights,
    dora_layers,
    impl,
    inputs,
    loss_of,
    make_dora_pair,
    make_pair,
    out,
    perturb_magnitudes,
    ref,
    set_active,
)
from switches import use_settings

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's DoRA against PEFT's")

CASES = [("llama", {}), ("llama", {"use_rslora": True, "lora_alpha": 16, "target_modules": "all-linear"}),
         ("gpt2", {}), ("mlp", {})]
IDS = ["llama", "llama-rslora-all", "gpt2-fan_in_fan_out", "mlp-bias"]


_pair = make_dora_pair


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _check_grads(r, i):
    rg, ig = _grads(r), _grads(i)
    assert set(rg) == set(ig)
    mags = [n for n in rg if "lora_magnitude_vector" in n]
    assert mags and any("lora_A" in n for n in rg) and any("lora_B" in n for n in rg)
    for n in rg:
        assert ig[n] is not None and rg[n] is not None, n
        assert ig[n].abs().sum() > 0, n  # a real gradient, not a vacuous match
        assert_close(ig[n], rg[n], atol=1e-5, rtol=1e-4, msg=n)


_layers = dora_layers


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_outputs_and_grads_match_peft(case, dropout):
    kind, kw = case
    _, r, i = _pair(kind, lora_dropout=dropout, **kw)
    r.train()
    i.train()
    x = inputs(kind)
    torch.manual_seed(3)
    r_loss = loss_of(r, x)
    torch.manual_seed(3)
    i_loss = loss_of(i, x)
    assert_close(i_loss, r_loss, atol=1e-6, rtol=1e-6)
    r_loss.backward()
    i_loss.backward()
    _check_grads(r, i)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eval_outputs_and_grads_match_peft(case):
    kind, kw = case
    _, r, i = _pair(kind, lora_dropout=0.1, **kw)
    r.eval()
    i.eval()
    x = inputs(kind, seed=4)
    with torch.no_grad():
        expected = out(r, x)
        assert_close(out(i, x), expected)
        assert_close(out(i, x), expected)  # from the cached scale
        with r.disable_adapter():
            assert not torch.allclose(out(r, x), expected, atol=1e-4)
    # eval mode with autograd on: the cached norm must still let the magnitude get its gradient
    r_loss, i_loss = loss_of(r, x), loss_of(i, x)
    r_loss.backward()
    i_loss.backward()
    _check_grads(r, i)


def test_forward_never_builds_the_dense_delta(monkeypatch):
    """B·A ([out, in]) is never formed on the forward/backward path: get_delta_weight may not even be called."""
    _, r, i = _pair("llama")
    from peft_fast import LoraLinear

    def refuse(self, name):
        raise AssertionError("get_delta_weight called in forward")

    monkeypatch.setattr(LoraLinear, "get_delta_weight", refuse)
    x = inputs("llama")
    i.train()
    loss_of(i, x).backward()
    i.eval()
    with torch.no_grad():
        out(i, x)


def test_magnitude_init_and_requires_grad():
    _, r, i = _pair("gpt2", copy=False)
    rp, ip = dict(r.named_parameters()), dict(i.named_parameters())
    mags = [n for n in ip if "lora_magnitude_vector" in n]
    assert mags and all(n.endswith(".default.weight") for n in mags)
    for n in mags:
        assert ip[n].requires_grad and ip[n].dtype == rp[n].dtype
        assert_close(ip[n], rp[n], atol=1e-6, rtol=1e-6, msg=n)


def test_lora_bias_with_dora_is_refused():
    with pytest.raises(ValueError, match="DoRA"):
        impl.LoraConfig(target_modules=["lin0"], use_dora=True, lora_bias=True)


# ------------------------------------------------------------------------------------------------- merging
def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "mlp"])
def test_merge_unmerge_match_peft(kind, safe):
    _, r, i = _pair(kind)
    r.eval()
    i.eval()
    x = inputs(kind)
    before = _base_weights(i)
    with torch.no_grad():
        expected = out(r, x)
    lora_merged = {n.removesuffix("base_layer.weight"): None for n in before}
    for name, m in i.named_modules():
        if name + "." in lora_merged:  # what a plain LoRA merge would give: DoRA's must differ
            lora_merged[name + "."] = before[name + ".base_layer.weight"] + m.get_delta_weight("default")
    r.merge_adapter(safe_merge=safe)
    i.merge_adapter(safe_merge=safe)
    rw, iw = _base_weights(r), _base_weights(i)
    for n in rw:
        assert not torch.allclose(iw[n], before[n], atol=1e-4), n
        assert not torch.allclose(iw[n], lora_merged[n.removesuffix("base_layer.weight")], atol=1e-4), n
        assert_close(iw[n], rw[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():
        assert_close(out(i, x), expected, atol=1e-5, rtol=1e-5)
    r.unmerge_adapter()
    i.unmerge_adapter()
    for n, w in _base_weights(i).items():
        assert_close(w, before[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():
        assert_close(out(i, x), expected)


def test_two_dora_adapters_merged_in_turn_and_unloaded():
    """The second adapter's norm is taken over the unmerged base, as PEFT's _unmerged_base_weight does."""
    _, r, i = _pair("llama")
    add_both(r, i, "other", "llama", seed=5, use_dora=True, r=2, lora_alpha=6)
    add_both(r, i, "plain", "llama", seed=6, r=3)
    perturb_magnitudes(r, i, seed=1)
    names = ["default", "plain", "other"]
    set_active(r, names)
    set_active(i, names)
    r.eval()
    i.eval()
    x = inputs("llama")
    with torch.no_grad():
        expected = out(r, x)
        assert_close(out(i, x), expected)
    before = _base_weights(i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.base_model.merge_adapter(names)
        i.base_model.merge_adapter(names)
    rw, iw = _base_weights(r), _base_weights(i)
    for n in rw:
        assert_close(iw[n], rw[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():
        assert_close(out(i, x), expected, atol=2e-5, rtol=2e-5)
    i.unmerge_adapter()
    for n, w in _base_weights(i).items():
        assert_close(w, before[n], atol=1e-6, rtol=1e-5, msg=n)
    merged_r = r.merge_and_unload()
    merged_i = i.merge_and_unload(safe_merge=True)
    rs, is_ = merged_r.state_dict(), merged_i.state_dict()
    assert set(rs) == set(is_)
    for k in rs:
        assert_close(is_[k], rs[k], atol=1e-6, rtol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_files_both_ways(kind, tmp_path):
    _, r, i = _pair(kind)
    with torch.no_grad():  # the two adapters differ, so that a file loaded in the wrong place shows
        for n, p in r.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.5)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    r_file = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    i_file = load_file(str(tmp_path / "impl" / "adapter_model.safetensors"))
    assert set(i_file) == set(r_file)
    mags = [k for k in i_file if "magnitude" in k]
    assert mags and all(k.endswith(".lora_magnitude_vector") for k in mags)
    x = inputs(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tiny_models import base_model

        r_loaded = ref.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "impl"))
        i_loaded = impl.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "ref"))
    for m in (r, i, r_loaded, i_loaded):
        m.eval()
    with torch.no_grad():
        assert_close(out(r_loaded, x), out(i, x))
        assert_close(out(i_loaded, x), out(r, x))
        assert not torch.allclose(out(i_loaded, x), out(i, x), atol=1e-4)
    sd = impl.get_peft_model_state_dict(i_loaded)
    for k in mags:
        assert torch.equal(sd[k], r_file[k]), k


# ------------------------------------------------------------------------------------------------- other paths
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_triton_backend_train_and_eval(monkeypatch, dropout):
    from peft_fast.kernels import interpreting

    if not (interpreting() or torch.cuda.is_available()):
        pytest.skip("no Triton device")
    _, r, i = _pair("llama", lora_dropout=dropout)
    use_settings(monkeypatch, backend="triton")
    import peft_fast.tuners.lora.dora as dora_mod

    fused = []
    op = "dora_dropout_linear" if dropout else "dora_linear"
    real = getattr(dora_mod, op)
    monkeypatch.setattr(dora_mod, op, lambda *a, **k: fused.append(1) or real(*a, **k))
    if dropout:  # our masks come from seeds (as LoRA's on Triton): PEFT's dropout modules replay them
        _replay_masks_in_peft(monkeypatch, r, dropout)
    r.train()
    i.train()
    x = inputs("llama", batch=2, seq=4)
    torch.manual_seed(11)
    i_loss = loss_of(i, x)  # ours first: PEFT replays its masks
    torch.manual_seed(11)
    r_loss = loss_of(r, x)
    assert len(fused) == 6  # every DoRA layer (3 targets x 2 layers) took the fused op
    assert_close(i_loss, r_loss, atol=1e-5, rtol=1e-5)
    r_loss.backward()
    i_loss.backward()
    _check_grads(r, i)
    r.eval()
    i.eval()
    with torch.no_grad():
        assert_close(out(i, x), out(r, x), atol=1e-5, rtol=1e-5)


def test_triton_backend_dropout_under_autocast(monkeypatch):
    """Under autocast the dropout op takes autocast's dtype for its base matmuls, as PEFT's F.linear calls do."""
    from peft_fast.kernels import interpreting

    if not (interpreting() or torch.cuda.is_available()):
        pytest.skip("no Triton device")
    _, r, i = _pair("llama", lora_dropout=0.2)
    use_settings(monkeypatch, backend="triton")
    import peft_fast.tuners.lora.dora as dora_mod

    taken = []
    real = dora_mod.dora_dropout_linear
    monkeypatch.setattr(dora_mod, "dora_dropout_linear", lambda *a, **k: taken.append(1) or real(*a, **k))
    _replay_masks_in_peft(monkeypatch, r, 0.2)
    r.train()
    i.train()
    x = inputs("llama", batch=2, seq=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    losses = []
    for model in (i, r):  # ours first: PEFT replays its masks
        torch.manual_seed(11)
        with torch.autocast(device, dtype=torch.bfloat16):
            losses.append(loss_of(model, x))
    assert len(taken) == 6
    assert_close(losses[0], losses[1], atol=2e-2, rtol=2e-2)


def _replay_masks_in_peft(monkeypatch, peft_model, p):
    """Record the seed of each dora_dropout_linear call and make PEFT's dropout modules, called in the same order,
    multiply by the mask that seed gives (lora_mm.masked_add: the mask of the LoRA matmuls)."""
    import sys

    from peft_fast.kernels.common.lora_mm import masked_add

    op_mod = sys.modules["peft_fast.kernels.dora_dropout_linear"]  # (the package's attribute is the op itself)

    seeds = []
    real_seed = op_mod.dropout_seed
    monkeypatch.setattr(op_mod, "dropout_seed", lambda device: seeds.append(real_seed(device)) or seeds[-1])

    class Replay(torch.nn.Module):
        def forward(self, x):
            x2d = x.reshape(-1, x.shape[-1])
            mask = torch.empty_like(x2d)
            masked_add(None, torch.ones_like(x2d), mask, seeds.pop(0), p)
            return x * mask.view(x.shape)

    for module in peft_model.modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"] = Replay()


def test_delete_and_readd_adapter():
    _, r, i = _pair("mlp")
    i.add_adapter("x", impl.LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights=False))
    assert any("lora_magnitude_vector.x" in n for n, _ in i.named_parameters())
    i.delete_adapter("x")
    assert not any("lora_magnitude_vector.x" in n for n, _ in i.named_parameters())


def test_add_weighted_adapter_with_dora_matches_peft():
    """PEFT creates the combined adapter with its magnitude initialised at creation (B = 0: ||W||) and then writes
    the combined A and B; peft_fast does the same."""
    _, r, i = _pair("mlp", init_lora_weights=True)
    add_both(r, i, "b", "mlp", seed=3, use_dora=True, init_lora_weights=True, lora_alpha=3)
    with torch.no_grad():
        for n, p in r.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    copy_weights(r, i)
    for combo in ("cat", "linear", "svd"):
        name = f"w_{combo}"
        r.add_weighted_adapter(["default", "b"], [0.6, 0.9], name, combination_type=combo)
        i.add_weighted_adapter(["default", "b"], [0.6, 0.9], name, combination_type=combo)
        r.set_adapter(name)
        i.set_adapter(name)
        r.eval()
        i.eval()
        x = inputs("mlp")
        with torch.no_grad():
            assert_close(out(i, x), out(r, x), msg=combo)


def test_hotswap_of_dora_adapters_is_refused_and_changes_nothing(tmp_path):
    from peft_fast.tuners.lora import hotswap as hs

    _, r, i = _pair("llama")
    _, r2, _ = make_pair("llama", use_dora=True, seed=1)
    r2.save_pretrained(tmp_path)
    i.eval()
    x = inputs("llama")
    with torch.no_grad():
        before = out(i, x)
    state = {k: v.clone() for k, v in i.state_dict().items()}
    with pytest.raises(ValueError, match="DoRA"):
        hs.hotswap_adapter(i, str(tmp_path), "default")
    for k, v in i.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(out(i, x), before)


@pytest.mark.parametrize("kind,dtype", [("llama", torch.bfloat16), ("gpt2", torch.float16)])
def test_16bit_dense_base_matches_peft(kind, dtype):
    """A 16-bit dense base (bf16 Llama, fp16 GPT-2 / Conv1D): PEFT's outputs and gradients within 16-bit rounding.
    Not bit for bit: the norm comes from the float32 expansion (dora_norm), PEFT's from the dense W + s·B·A."""
    from tiny_models import base_model

    _, r, i = _pair(kind, base=base_model(kind).to(dtype))
    x = inputs(kind, seed=7)

    def rel(got, want):
        return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()

    r.eval()
    i.eval()
    with torch.no_grad():
        want, got = out(r, x), out(i, x)
    assert got.dtype == want.dtype == dtype and rel(got, want) < 1e-2
    r.train()
    i.train()
    torch.manual_seed(3)  # the same dropout masks inside the model on both sides
    loss_of(r, x).float().backward()
    torch.manual_seed(3)
    loss_of(i, x).float().backward()
    rg, ig = _grads(r), _grads(i)
    assert set(rg) == set(ig) and any("lora_magnitude_vector" in n for n in rg)
    for n in rg:
        assert ig[n].abs().sum() > 0 and rel(ig[n], rg[n]) < 3e-2, n


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_safe_merge_with_nan_magnitude_is_refused_and_changes_nothing(kind):
    """A NaN in a magnitude makes the merged weight NaN: safe_merge refuses it, as PEFT does, before any change."""
    from tiny_models import snapshot

    _, r, i = _pair(kind)
    for model in (r, i):
        mags = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
        with torch.no_grad():
            mags[-1][0] = float("nan")  # the last layer: every earlier layer would merge first if not all-or-nothing
    before = snapshot(i)
    for model in (r, i):
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            model.merge_adapter(safe_merge=True)
    after = snapshot(i)
    assert after["modules"] == before["modules"] and after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():  # the NaN stays where it was (NaN != NaN, hence nan_to_num)
        assert torch.equal(v.nan_to_num(), after["state"][k].nan_to_num()), k
    assert not any(getattr(m, "merged", False) for m in i.modules())
