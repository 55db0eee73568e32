"""OFT on torch's Conv2d against PEFT 0.21.2 (lycoris_pairs.TinyConv: conv0 3x3 with padding, conv1 1x1 with stride
2, a Linear head): parameters and init, 1x1 convolutions in training and eval, merging, files, refusals.

A deliberate difference on kernels larger than 1: PEFT 0.21.2 rotates every stride-1 patch of the input, sums the
patches back into an image (its _fold also views the [B, C, H', W', kh, kw] patches as [B, C·kh·kw, H'·W'],
mixing kernel and spatial positions) and runs the base convolution on that. Its forward is then no rotation of
the filters: a freshly initialised (identity) adapter changes the layer's output, and merging changes the model.
peft_fast's forward is PEFT's merge rule, the base convolution with W·diag(R)ᵀ: an identity adapter is a no-op,
the outputs are PEFT's merged model's, and the gradients are those of PEFT's own rotation (get_weight) through it.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from lycoris_pairs import assert_eval_matches, assert_same_files, assert_train_step_matches, conv_base, conv_inputs
from oft_adalora_pairs import OFTConfig, add_both, build, cfg, pair
from tiny_models import assert_close, assert_same_params, assert_same_state, impl, out, peft_fast_only, \
    raises_like_peft, ref

CASES = [{}, {"r": 1, "oft_block_size": 0}, {"block_share": True, "use_cayley_neumann": False}, {"coft": True}]
IDS = ["default", "r=1", "block_share-cayley", "coft"]
ONE_BY_ONE = ["conv1", "head"]  # where PEFT's forward is a rotation of the filters


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_parameters_and_init_match_peft(kw):
    _, r, i = build("oft", "conv", **kw)
    assert_same_params(r, i)
    assert_same_state(r, i, atol=0, rtol=0)
    assert [s.module_type for s in i.get_layer_status()] == [s.module_type for s in r.get_layer_status()]


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_1x1_convolutions_match_peft(kw):
    _, r, i = pair("oft", "conv", target_modules=ONE_BY_ONE, **kw)
    x = conv_inputs()
    assert_train_step_matches("conv", r, i, x, steps=2)
    assert_eval_matches("conv", r, i, x)


def test_peft_3x3_forward_is_no_rotation_of_the_filters():
    """What the deliberate difference is about (if PEFT fixes it, this fails, and the difference can go)."""
    base = conv_base()
    x = conv_inputs()
    identity = ref.get_peft_model(copy.deepcopy(base), ref.OFTConfig(**cfg("oft", "conv", target_modules=["conv0"],
                                                                          init_weights=True)))
    identity.eval()
    _, r, _ = pair("oft", "conv", target_modules=["conv0"])
    r.eval()
    with torch.no_grad():
        assert (out(identity, x) - base(**x)).abs().max() > 1e-3
        unmerged = out(r, x)
        r.merge_adapter()
        assert (out(r, x) - unmerged).abs().max() > 1e-3


@peft_fast_only
@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_3x3_forward_is_peft_merged_model(kw):
    """An identity adapter changes nothing; a trained one gives PEFT's merged model, in training and in eval."""
    base = conv_base()
    x = conv_inputs()
    identity = impl.get_peft_model(copy.deepcopy(base), OFTConfig(**cfg("oft", "conv", init_weights=True, **kw)))
    with torch.no_grad():
        assert_close(out(identity, x), base(**x))
    _, r, i = pair("oft", "conv", **kw)
    with torch.no_grad():
        r.eval()
        r.merge_adapter()
        want = out(r, x)
        for mode in ("train", "eval"):
            getattr(i, mode)()
            assert_close(out(i, x), want, msg=mode)


@peft_fast_only
@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_3x3_gradients_are_those_of_peft_rotation(kw):
    """conv(x, W·diag(R)ᵀ) with R from PEFT's own OFTRotationModule.get_weight: the loss and the block gradients
    (blocks near the identity, as trained ones are; peft_fast sums the Neumann series in another order)."""
    _, r, i = pair("oft", "conv", target_modules=["conv0"], init_weights=True, **kw)
    ref_layer, layer = r.base_model.model.conv0, i.base_model.model.conv0
    h = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    ref_layer.train()
    layer.train()
    base = ref_layer.base_layer
    module = ref_layer.oft_R["default"]
    module.get_weight()  # COFT's projection, in place (its R is computed without gradients there)
    blocks = module._cayley_batch(module.weight, module.block_size, module.use_cayley_neumann,
                                  module.num_cayley_neumann_terms)
    rot = module._block_diagonal(blocks, module.in_features // module.block_size)  # [27, 27], differentiable
    w = (rot @ base.weight.view(8, -1).T).T.reshape(base.weight.shape)
    want = F.conv2d(h, w, base.bias, base.stride, base.padding).pow(2).sum()
    got = layer(h).pow(2).sum()
    assert_close(got, want)
    want.backward()
    got.backward()
    assert_close(layer.oft_R["default"].weight.grad, ref_layer.oft_R["default"].weight.grad)


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_merge_unmerge_and_unload(kw):
    """PEFT's merged weights (its rule is the same on every kernel size), unmerged back, and the merged model."""
    _, r, i = pair("oft", "conv", init_weights=True, **kw)
    x = conv_inputs()
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        for m in (r, i):
            m.merge_adapter(safe_merge=True)
        assert_same_state(r, i)
        assert_close(out(i, x), out(r, x))
        for m in (r, i):
            m.unmerge_adapter()
        assert_same_state(r, i)
        merged_r, merged_i = r.merge_and_unload(), i.merge_and_unload()
        assert type(merged_i.conv0) is torch.nn.Conv2d
        assert_same_state(merged_r, merged_i)


def test_files_both_ways(tmp_path):
    """The same files; PEFT's merged model and peft_fast load each other's files with the same outputs."""
    _, r, i = pair("oft", "conv")
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert_same_files(tmp_path / "impl", tmp_path / "ref")
    x = conv_inputs()
    with torch.no_grad():
        want = out(r.merge_and_unload(), x)
        for src in ("ref", "impl"):
            loaded = impl.PeftModel.from_pretrained(conv_base(), str(tmp_path / src))
            peft_loaded = ref.PeftModel.from_pretrained(conv_base(), str(tmp_path / src))
            assert_close(out(peft_loaded.merge_and_unload(), x), want, msg=src)
            if impl is not ref:
                assert_close(out(loaded, x), want, msg=src)


def test_refusals_like_peft():
    base = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, dilation=2), torch.nn.Conv1d(4, 4, 1))
    for target, exc, words in (("0", ValueError, ["dilation > 1"]), ("1", TypeError, ["is not supported"])):
        raises_like_peft(exc, words,
                         lambda: impl.get_peft_model(copy.deepcopy(base), OFTConfig(target_modules=[target])),
                         lambda: ref.get_peft_model(copy.deepcopy(base), ref.OFTConfig(target_modules=[target])))


@peft_fast_only
def test_refused_up_front_where_peft_fails_later():
    """A non-square kernel (PEFT fails in forward) and merging into a grouped Conv2d (PEFT fails in merge)."""
    with pytest.raises(ValueError, match="square-kernel"):
        impl.get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(4, 4, (3, 1))), OFTConfig(target_modules=["0"]))
    model = impl.get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1, groups=2)),
                                OFTConfig(target_modules=["0"], oft_block_size=2, init_weights=False))
    before = model.base_model.model[0].base_layer.weight.clone()
    with pytest.raises(ValueError, match="groups=2"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model[0].base_layer.weight, before)
    x = torch.randn(2, 4, 5, 5)
    assert model(x).shape == (2, 8, 5, 5)


@peft_fast_only
def test_mixed_batch_on_convolutions():
    _, r, i = pair("oft", "conv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_both("oft", r, i, "b", "conv", seed=2, target_modules=["conv0", "head"])
    x = conv_inputs(batch=3)
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        mixed = out(i, x, adapter_names=["b", "default", "__base__"])
        for row, name in enumerate(["b", "default"]):
            i.set_adapter(name)
            assert_close(mixed[row:row + 1], out(i, {"X": x["X"][row:row + 1]}))
        with i.disable_adapter():
            assert_close(mixed[2:], out(i, {"X": x["X"][2:]}))
