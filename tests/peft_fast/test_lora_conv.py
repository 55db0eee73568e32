"""LoRA on torch's convolutions (lora.Conv1d / Conv2d / Conv3d) against PEFT 0.21.2, on a small conv model (a 3x5
Conv2d with stride and padding, a 1x1 Conv2d, a strided Conv1d, a Linear head) and single-layer bases for groups,
Conv3d, dilation and padding modes: parameters and init under one seed, forward and gradients of every LoRA
parameter (dropout and DoRA included), files both ways, merging, several adapters, mixed batches, refusals.

A deliberate difference (conv.py): lora_A takes the base's dilation and padding_mode, which PEFT 0.21 drops (its
forward then fails on a dilated base, and differs from its own merged layer with another padding_mode); peft_fast's
forward is PEFT's merged layer there."""
import copy
import warnings

import pytest
import torch
from lycoris_pairs import assert_eval_matches, assert_same_files, assert_train_step_matches
from torch import nn

from merge_checks import WEIGHTED_TYPES, check_merge_round_trip, merged_deltas
from tiny_models import assert_close, assert_same_params, assert_same_state, assert_unchanged, copy_weights, \
    impl, out, peft_fast_only, perturb_magnitudes, raises_like_peft, ref, set_active, snapshot

TARGETS = ["conv0", "conv1", "conv2"]
CASES = [
    {},
    {"init_lora_weights": True},
    {"init_lora_weights": "gaussian"},
    {"lora_bias": True},
    {"rank_pattern": {"conv0": 2}, "alpha_pattern": {"conv2": 3}, "use_rslora": True},
    {"lora_dropout": 0.25},
    {"target_modules": ["conv0", "conv2", "head"]},
    {"use_dora": True},
    {"use_dora": True, "lora_dropout": 0.25},
]
IDS = ["-".join(f"{k}={v}" for k, v in kw.items()) or "default" for kw in CASES]


class ConvNet(nn.Module):
    """conv0: 3x5 Conv2d, stride (2, 1), padding (1, 2); conv1: 1x1 Conv2d without bias; conv2: 5-tap Conv1d with
    stride 2; head: Linear."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2))
        self.conv1 = nn.Conv2d(8, 8, 1, bias=False)
        self.conv2 = nn.Conv1d(8, 6, 5, stride=2, padding=2)
        self.head = nn.Linear(6, 4)

    def forward(self, X):
        h = torch.relu(self.conv1(torch.relu(self.conv0(X))))  # [N, 8, 4, 8]
        return self.head(torch.relu(self.conv2(h.flatten(2))).mean(-1))  # conv2: [N, 6, 16]


class One(nn.Module):
    """A single convolution, `conv`."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, X):
        return self.conv(X)


BASES = {
    "net": (ConvNet, (3, 3, 8, 8)),
    "groups": (lambda: One(nn.Conv2d(4, 8, 3, padding=1, groups=2)), (3, 4, 6, 6)),
    "conv3d": (lambda: One(nn.Conv3d(2, 4, (3, 1, 3), padding=(1, 0, 1))), (3, 2, 4, 5, 5)),
    "dilated": (lambda: One(nn.Conv2d(3, 4, 3, padding=2, dilation=2)), (3, 3, 8, 8)),
    "reflect": (lambda: One(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), (3, 3, 8, 8)),
}
_BASES: dict = {}


def base(kind: str = "net") -> nn.Module:
    if kind not in _BASES:
        torch.manual_seed(0)
        _BASES[kind] = BASES[kind][0]()
    return copy.deepcopy(_BASES[kind])


def inputs(kind: str = "net", seed: int = 1) -> dict:
    return {"X": torch.randn(BASES[kind][1], generator=torch.Generator().manual_seed(seed))}


def cfg(kind: str = "net", **kw) -> dict:
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": False,
            "target_modules": list(TARGETS) if kind == "net" else ["conv"], **kw}


def build(kind: str = "net", seed: int = 0, **kw):
    """(PEFT model, implementation model) under one seed, each with its own config object."""
    bases = base(kind), base(kind)  # before seeding: the first call builds the base model from its own seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        r = ref.get_peft_model(bases[0], ref.LoraConfig(**cfg(kind, **kw)))
        torch.manual_seed(seed)
        i = impl.get_peft_model(bases[1], impl.LoraConfig(**cfg(kind, **kw)))
    return r, i


def pair(kind: str = "net", **kw):
    r, i = build(kind, **kw)
    if kw.get("use_dora"):
        perturb_magnitudes(r, i)  # a fresh magnitude makes DoRA's scale exactly 1
    copy_weights(r, i)
    return r, i


def add_both(ref_model, impl_model, name: str, seed: int, kind: str = "net", **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref_model.add_adapter(name, ref.LoraConfig(**cfg(kind, **kw)))
        torch.manual_seed(seed)
        impl_model.add_adapter(name, impl.LoraConfig(**cfg(kind, **kw)))
    copy_weights(ref_model, impl_model)


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_parameters_and_init_match_peft(kw):
    r, i = build(**kw)
    assert_same_params(r, i)
    tol = 1e-6 if kw.get("use_dora") else 0  # DoRA's magnitude is a norm (rounding); the draws are PEFT's
    assert_same_state(r, i, atol=tol, rtol=tol)
    types = [s.module_type for s in i.get_layer_status()]
    assert types == [s.module_type for s in r.get_layer_status()]
    assert {"lora.Conv2d", "lora.Conv1d"} <= set(types)


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_forward_and_gradients_match_peft(kw):
    r, i = pair(**kw)
    x = inputs()
    assert_train_step_matches("conv", r, i, x, steps=2)
    assert_same_state(r, i)
    assert_eval_matches("conv", r, i, x)
    with torch.no_grad():  # a second eval call (DoRA's cached scale) gives the same
        assert_close(out(i, x), out(r, x))


@pytest.mark.parametrize("kind", ["groups", "conv3d"])
def test_grouped_and_3d_convolutions_match_peft(kind):
    r, i = build(kind)
    assert_same_state(r, i, atol=0, rtol=0)
    assert [s.module_type for s in i.get_layer_status()] == [s.module_type for s in r.get_layer_status()]
    x = inputs(kind)
    assert_train_step_matches("conv", r, i, x, steps=2)
    assert_eval_matches("conv", r, i, x)
    if kind == "conv3d":
        with torch.no_grad():
            want = out(r, x)
            for m in (r, i):
                m.merge_adapter()
            assert_same_state(r, i)
            assert_close(out(i, x), want)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_files_both_ways(dora, tmp_path):
    r, i = pair(use_dora=dora, lora_bias=not dora)
    add_both(r, i, "second", seed=2, target_modules=["conv0", "head"], r=2, use_dora=dora)
    for m in (r, i):
        m.save_pretrained(tmp_path / ("ref" if m is r else "impl"))
    for sub in ("", "second"):
        assert_same_files(tmp_path / "impl" / sub, tmp_path / "ref" / sub)
    x = inputs()
    r.eval()
    with torch.no_grad():
        want = {"default": out(r, x)}
        r.set_adapter("second")
        want["second"] = out(r, x)
    for src in ("ref", "impl"):
        for lib in (impl, ref):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = lib.PeftModel.from_pretrained(base(), str(tmp_path / src))
                loaded.load_adapter(str(tmp_path / src / "second"), adapter_name="second")
            with torch.no_grad():
                assert_close(out(loaded, x), want["default"], msg=f"{src} -> {lib.__name__}")
                loaded.set_adapter("second")
                assert_close(out(loaded, x), want["second"], msg=f"{src} -> {lib.__name__}")


@pytest.mark.parametrize("kw", [{}, {"lora_bias": True}, {"use_dora": True}], ids=["lora", "lora_bias", "dora"])
def test_merge_unmerge_and_unload(kw):
    r, i = pair(**kw, **({"target_modules": ["conv0", "conv2"]} if kw.get("lora_bias") else {}))  # with biases
    add_both(r, i, "other", seed=1, target_modules=["conv0", "conv2"], **kw)
    if kw.get("use_dora"):
        perturb_magnitudes(r, i, seed=1)
    x = inputs()
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        _, merged_i = check_merge_round_trip(r, i, x, out)
        assert type(merged_i.conv0) is nn.Conv2d and type(merged_i.conv2) is nn.Conv1d
    r, i = pair()
    assert_same_state(r.unload(), i.unload(), atol=0, rtol=0)


def test_several_adapters_set_disable_delete():
    r, i = pair()
    add_both(r, i, "other", seed=3, target_modules=["conv0", "conv1"], r=6, lora_dropout=0.1)
    x = inputs()
    for names in (["default", "other"], "other"):
        for m in (r, i):
            set_active(m, names)
        assert_train_step_matches("conv", r, i, x)
        assert_eval_matches("conv", r, i, x)
    for m in (r, i):
        m.eval()
    with torch.no_grad(), r.disable_adapter(), i.disable_adapter():
        assert_close(out(i, x), out(r, x))
        assert_close(out(i, x), base()(**x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (r, i):
            m.delete_adapter("other")
    assert i.active_adapters == r.active_adapters == ["default"]
    assert_same_state(r, i)
    assert_eval_matches("conv", r, i, x)


def test_mixed_batch_matches_peft():
    """`adapter_names`: each row through its adapter (PEFT's _mixed_batch_forward), outputs and gradients."""
    r, i = pair()
    add_both(r, i, "b", seed=1, target_modules=["conv0", "conv2", "head"], r=2)
    x = inputs()
    names = ["b", "default", "__base__"]
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        assert_close(out(i, x, adapter_names=names), out(r, x, adapter_names=names))
    for m in (r, i):
        out(m, x, adapter_names=names).pow(2).mean().backward()
    params = dict(i.named_parameters())
    for n, p in r.named_parameters():
        if p.grad is not None:
            assert_close(params[n].grad, p.grad, msg=n)


def test_refusals_like_peft():
    """A module LoRA does not adapt, a rank that groups do not divide, PiSSA, merging a grouped convolution or a
    lora_bias adapter over a base without bias, DoRA in a mixed batch."""
    norm = One(nn.LayerNorm(4))
    raises_like_peft(ValueError, ["is not supported", "`torch.nn.Embedding`", "`torch.nn.Conv3d`"],
                     lambda: impl.get_peft_model(norm, impl.LoraConfig(target_modules=["conv"])),
                     lambda: ref.get_peft_model(copy.deepcopy(norm), ref.LoraConfig(target_modules=["conv"])))
    assert type(norm.conv) is nn.LayerNorm
    for kw, exc, words in (({"r": 3}, ValueError, ["groups=2 and rank 3", "divisible by groups"]),
                           ({"init_lora_weights": "pissa"}, ValueError, ["Unknown initialization"])):
        grouped = base("groups")
        snap = snapshot(grouped)
        raises_like_peft(exc, words,
                         lambda g=grouped, k=kw: impl.get_peft_model(g, impl.LoraConfig(**cfg("groups", **k))),
                         lambda k=kw: ref.get_peft_model(base("groups"), ref.LoraConfig(**cfg("groups", **k))))
        if impl is not ref:
            assert_unchanged(grouped, snap)
    for kind, kw, exc, words in (("groups", {}, NotImplementedError, ["groups > 1"]),
                                 ("net", {"lora_bias": True}, RuntimeError, ["base layer has no bias"])):
        r, i = build(kind, **kw)  # PEFT raises when it reaches the layer; peft_fast before any layer changes
        snap = snapshot(i)
        raises_like_peft(exc, words, i.merge_adapter, r.merge_adapter)
        if impl is not ref:
            assert_unchanged(i, snap)
    r, i = pair(use_dora=True)
    for m in (r, i):
        m.eval()
    raises_like_peft(ValueError, ["Cannot pass `adapter_names` when DoRA is enabled"],
                     lambda: out(i, inputs(), adapter_names=["default"] * 3),
                     lambda: out(r, inputs(), adapter_names=["default"] * 3))


def test_all_linear_adapts_only_linear_layers():
    r, i = build(target_modules="all-linear")
    assert [(s.name, s.module_type) for s in i.get_layer_status()] == \
        [(s.name, s.module_type) for s in r.get_layer_status()] == [("model.head", "lora.Linear")]


def test_peft_forward_is_not_its_merged_layer_on_dilated_or_padded_convolutions():
    """What the deliberate difference is about (if PEFT fixes it, this fails, and the difference can go)."""
    r, _ = build("dilated")
    with pytest.raises(RuntimeError):
        out(r, inputs("dilated"))
    r, _ = build("reflect")
    r.eval()
    x = inputs("reflect")
    with torch.no_grad():
        unmerged = out(r, x)
        r.merge_adapter()
        assert (out(r, x) - unmerged).abs().max() > 1e-3


@peft_fast_only
@pytest.mark.parametrize("kind", ["dilated", "reflect"])
def test_dilated_and_padded_forward_is_peft_merged_layer(kind, tmp_path):
    r, i = build(kind)
    assert_same_state(r, i, atol=0, rtol=0)
    x = inputs(kind)
    with torch.no_grad():
        r.merge_adapter()
        want = out(r, x)
        r.unmerge_adapter()
        for mode in ("train", "eval"):
            getattr(i, mode)()
            assert_close(out(i, x), want, msg=mode)
        assert_same_state(r.merge_and_unload(), i.merge_and_unload())
    r, i = build(kind)
    for m in (r, i):
        m.save_pretrained(tmp_path / ("ref" if m is r else "impl"))
    assert_same_files(tmp_path / "impl", tmp_path / "ref")


@peft_fast_only
def test_dora_on_a_grouped_convolution_is_refused():
    grouped = base("groups")
    with pytest.raises(ValueError, match="use_dora.*groups=2"):
        impl.get_peft_model(grouped, impl.LoraConfig(**cfg("groups", use_dora=True)))
    assert type(grouped.conv) is nn.Conv2d


@peft_fast_only
def test_hotswap_of_convolutions(tmp_path):
    """A prepared model takes a smaller-rank adapter in place: the outputs of that adapter loaded fresh. Grouped
    convolutions are refused up front."""
    from peft_fast.tuners.lora import hotswap

    _, i = pair()
    _, new = build(seed=5, r=2, lora_alpha=3, lora_bias=False)
    new.save_pretrained(tmp_path)
    hotswap.prepare_model_for_compiled_hotswap(i, target_rank=6)
    assert i.base_model.model.conv0.lora_A["default"].weight.shape == (6, 3, 3, 5)
    hotswap.hotswap_adapter(i, str(tmp_path), adapter_name="default")
    x = inputs()
    for m in (i, new):
        m.eval()
    with torch.no_grad():
        assert_close(out(i, x), out(new, x))
    _, grouped = build("groups")
    snap = snapshot(grouped)
    with pytest.raises(ValueError, match="groups=2"):
        hotswap.prepare_model_for_compiled_hotswap(grouped, target_rank=8)
    assert_unchanged(grouped, snap)


@peft_fast_only
@pytest.mark.parametrize("tuner", ["lora", "loha"])
def test_adapters_on_whisper_convolutions(tuner):
    """Whisper's encoder reads conv1.stride and conv2.stride from the layers it holds: adapter layers show the
    base's geometry (PEFT's lack it and fail there: AttributeError 'stride'), and the adapted model is its merged
    model."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=100, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=16,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_source_positions=8, max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
                        eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    base = WhisperForConditionalGeneration(cfg).eval()
    feats, dec = torch.randn(2, 8, 16), torch.tensor([[1, 5, 6], [1, 7, 8]])
    targets = ["conv1", "conv2", "q_proj"]
    config = (impl.LoraConfig(r=2, target_modules=targets, init_lora_weights=False) if tuner == "lora" else
              impl.LoHaConfig(r=2, target_modules=targets, init_weights=False))
    model = impl.get_peft_model(copy.deepcopy(base), config)
    enc = model.base_model.model.model.encoder
    for name in ("conv1", "conv2"):
        wrapped, plain = getattr(enc, name), getattr(base.model.encoder, name)
        assert type(wrapped).__name__ == ("LoraConv1d" if tuner == "lora" else "LoHaLayer")
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode"):
            assert getattr(wrapped, attr) == getattr(plain, attr), (name, attr)
    with torch.no_grad():
        got = model(input_features=feats, decoder_input_ids=dec).logits
        merged = copy.deepcopy(model).merge_and_unload()(input_features=feats, decoder_input_ids=dec).logits
        plain = base(input_features=feats, decoder_input_ids=dec).logits
    assert_close(got, merged, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the adapters do act (well above the 1e-5 tolerance)


@pytest.mark.parametrize("ctype", WEIGHTED_TYPES)
def test_add_weighted_adapter_over_convolutions_matches_peft(ctype, tmp_path):
    """The Conv2d layers (PEFT's SVD types reshape only Conv2d deltas: its SVD merges fail on the Conv1d, see
    the next test): the same merged deltas, under one seed for DARE's draws, and the file loads in PEFT."""
    targets = ["conv0", "conv1"]
    r, i = pair(target_modules=targets)
    add_both(r, i, "b", seed=3, target_modules=targets)
    for m in (r, i):
        torch.manual_seed(7)
        m.add_weighted_adapter(["default", "b"], [0.6, -0.9], "merged", combination_type=ctype, density=0.5)
    want, got = merged_deltas(r), merged_deltas(i)
    assert set(want) == set(got) == {"base_model.model.conv0", "base_model.model.conv1"}
    for n in want:
        assert_close(got[n], want[n], atol=1e-5, rtol=1e-5, msg=n)
    for m in (r, i):
        m.set_adapter("merged")
        m.eval()
    x = inputs()
    with torch.no_grad():
        assert_close(out(i, x), out(r, x), atol=1e-5, rtol=1e-5)
    i.save_pretrained(str(tmp_path), selected_adapters=["merged"])
    loaded = ref.PeftModel.from_pretrained(base(), str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert_close(out(loaded, x), out(i, x), atol=1e-5, rtol=1e-5)


@peft_fast_only
@pytest.mark.parametrize("ctype", ["cat", "svd", "magnitude_prune_svd"])  # (density 1: the plain sum)
def test_add_weighted_adapter_over_a_conv1d_is_the_combined_delta(ctype):
    """PEFT's SVD merges take a Conv1d's [out, in, k] delta as a batch of matrices and fail ("size mismatch"):
    here every convolution's delta is flattened to [out, in·k] for the SVD, so at full rank the merged adapter is
    the weighted sum of the deltas exactly."""
    _, i = pair()
    torch.manual_seed(3)
    i.add_adapter("b", impl.LoraConfig(**cfg()))  # init_lora_weights=False: random factors of its own
    i.add_weighted_adapter(["default", "b"], [0.6, -0.9], "merged", combination_type=ctype, svd_rank=8,
                           density=1.0)
    layers = {n: m for n, m in i.named_modules() if hasattr(m, "lora_A") and "merged" in m.lora_A}
    assert type(layers["base_model.model.conv2"]).__name__ == "LoraConv1d"
    for n, m in layers.items():
        exact = 0.6 * m.get_delta_weight("default") - 0.9 * m.get_delta_weight("b")
        assert m.lora_A["merged"].weight.shape[1:] == m.lora_A["default"].weight.shape[1:], n
        assert m.lora_B["merged"].weight.shape[2:] == m.lora_B["default"].weight.shape[2:], n
        assert_close(m.get_delta_weight("merged"), exact, atol=2e-6, rtol=1e-5, msg=n)


@peft_fast_only
@pytest.mark.parametrize("ctype", ["cat", "svd", "ties_svd"])
def test_concatenating_or_svd_over_a_grouped_convolution_is_refused(ctype):
    """B is [out, r/groups, 1, 1] there: concatenated, its groups would take the wrong channels (PEFT's cat is
    wrong), and an SVD gives no grouped factors (PEFT's fails). Refused by name, with nothing changed."""
    _, i = pair("groups")
    torch.manual_seed(3)
    i.add_adapter("b", impl.LoraConfig(**cfg("groups")))
    snap = snapshot(i)
    with pytest.raises(NotImplementedError, match="grouped convolutions.*conv"):
        i.add_weighted_adapter(["default", "b"], [0.5, 0.5], "merged", combination_type=ctype, density=0.5)
    assert_unchanged(i, snap)
    assert "merged" not in i.peft_config


@pytest.mark.parametrize("ctype", ["linear", "ties"])
def test_factor_merges_over_a_grouped_convolution_match_peft(ctype):
    r, i = pair("groups")
    add_both(r, i, "b", seed=3, kind="groups")
    for m in (r, i):
        torch.manual_seed(7)
        m.add_weighted_adapter(["default", "b"], [0.7, -0.4], "merged", combination_type=ctype, density=0.5)
    want, got = dict(r.named_parameters()), dict(i.named_parameters())
    merged = [n for n in want if ".merged." in n]
    assert merged
    for n in merged:
        assert_close(got[n], want[n], msg=n)


@peft_fast_only
@pytest.mark.parametrize("ctype", ["cat", "svd"])
def test_one_adapter_over_a_grouped_convolution_is_rescaled(ctype):
    """One adapter is a rescale whatever the type: the merged adapter adds 0.7 of the source's delta."""
    _, i = pair("groups")
    i.add_weighted_adapter(["default"], [0.7], "merged", combination_type=ctype)
    x = inputs("groups")
    i.eval()
    with torch.no_grad():
        with i.disable_adapter():
            plain = out(i, x)
        delta = out(i, x) - plain
        i.set_adapter("merged")
        assert_close(out(i, x) - plain, 0.7 * delta, atol=1e-5, rtol=1e-4)
