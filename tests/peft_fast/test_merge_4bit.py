"""Merging LoRA into bitsandbytes 4-bit bases (a tiny Llama loaded in 4-bit on CPU by transformers), against PEFT.

Default: PEFT's dequantize / add / re-quantize, giving the same packed bytes and outputs as PEFT, and unmerge as
PEFT does it; the rounding this costs is reported in one warning per call (max and mean abs difference). With
`dequantize=True` the 4-bit layers become plain nn.Linear holding the exact merged weights. A broken adapter under
safe_merge is refused before any layer changes.
"""
import copy
import re
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from tiny_models import assert_close, impl, peft_fast_only, ref  # noqa: E402
from qlora_models import CASES, IDS, TARGETS, load4, save_tiny_llama  # noqa: E402

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_merge4"))


def lora_kw(**over):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": list(TARGETS), "init_lora_weights": False, "lora_dropout": 0.0}
    kw.update(over)
    return kw


def make_impl(path, case, **over):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return impl.get_peft_model(load4(path, case), impl.LoraConfig(**lora_kw(**over)))


def make_pair(path, case, **over):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref_model = ref.get_peft_model(load4(path, case), ref.LoraConfig(**lora_kw(**over)))
    impl_model = make_impl(path, case, **over)
    layer = ref_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb", type(layer)
    r_p = dict(ref_model.named_parameters())
    with torch.no_grad():
        for n, p in impl_model.named_parameters():
            if "lora_" in n:
                p.copy_(r_p[n])
    return ref_model, impl_model


def ids(seed=1, batch=3, seq=6):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model):
    model.eval()
    return model(input_ids=ids()).logits


def unpacked(weight):
    """(packed bytes, quant state) of a Params4bit, read back from bnb's CPU repacking if it was applied."""
    data, qs = weight.data, weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):  # the inverse rewrites the state it is given
        data, qs = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(qs))
    return data, qs


def dequant(weight):
    return bnb.functional.dequantize_4bit(*unpacked(weight))


def four_bit(model):
    return {n.replace(".base_layer", ""): m for n, m in model.named_modules()
            if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")}


def assert_same_4bit(actual_model, expected_model):
    a, e = four_bit(actual_model), four_bit(expected_model)
    assert set(a) == set(e) and a
    for n in a:
        (da, qa), (de, qe) = unpacked(a[n].weight), unpacked(e[n].weight)
        assert type(a[n].weight).__name__ == "Params4bit", n
        assert da.dtype == de.dtype and torch.equal(da, de), n
        assert qa.dtype == qe.dtype and qa.quant_type == qe.quant_type and qa.blocksize == qe.blocksize, n
        assert qa.nested == qe.nested, n
        assert torch.equal(qa.absmax, qe.absmax), n
        if qa.nested:
            assert torch.equal(qa.state2.absmax, qe.state2.absmax) and qa.offset == qe.offset, n


def tol(case):
    return {"atol": 1e-6, "rtol": 1e-6} if case[0] == torch.float32 else {"atol": 1e-5, "rtol": 8e-3}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload_requantizes_as_peft(model_dir, case):
    ref_model, impl_model = make_pair(model_dir, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_merged = ref_model.merge_and_unload()
        impl_merged = impl_model.merge_and_unload()
    assert type(impl_merged.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert_same_4bit(impl_merged, ref_merged)
    assert torch.equal(logits(impl_merged), logits(ref_merged))


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_merge_then_unmerge_as_peft(model_dir, case):
    ref_model, impl_model = make_pair(model_dir, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model.merge_adapter()
        impl_model.merge_adapter()
        assert_same_4bit(impl_model, ref_model)
        # no forward here: on an AVX512-BF16 CPU it repacks the weights, which PEFT's unmerge then misreads
        ref_model.unmerge_adapter()
        impl_model.unmerge_adapter()
    assert not any(m.merged for m in impl_model.modules() if hasattr(m, "merged_adapters"))
    assert_same_4bit(impl_model, ref_model)
    assert_close(logits(impl_model), logits(ref_model), **tol(case))


def _exact_merged(model, name="default"):
    """{layer key: dequantized base + delta} for every LoRA layer, computed directly."""
    out = {}
    for key, m in model.named_modules():
        if hasattr(m, "lora_A") and name in m.lora_A:
            delta = (m.lora_B[name].weight @ m.lora_A[name].weight) * m.scaling[name]
            out[key] = dequant(m.base_layer.weight) + delta
    return out


def _rounding_warnings(caught):
    return [w for w in caught if "quantized layer" in str(w.message) and "re-quantized" in str(w.message)]


@peft_fast_only
@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_rounding_warning_numbers(model_dir, case):
    model = make_impl(model_dir, case, r=8)
    exact = _exact_merged(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    found = _rounding_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in caught]  # one per call, aggregated over the 8 layers
    layers = dict(model.named_modules())
    diffs = [(exact[k].float() - dequant(layers[k].base_layer.weight).float()).abs().flatten() for k in exact]
    diffs = torch.cat(diffs).double()
    w = found[0].message
    assert isinstance(w, impl.QuantizedMergeWarning)
    assert w.adapters == ["default"] and w.layers == len(exact) == 8
    assert w.max_abs == diffs.max().item() > 0
    assert w.mean_abs == pytest.approx(diffs.mean().item(), rel=1e-9, abs=0)
    text = str(w)
    assert "default" in text and "max abs difference" in text and "mean abs difference" in text
    numbers = [float(x) for x in re.findall(r"\d\.\d{6}e[+-]\d+", text)]
    assert numbers == [pytest.approx(w.max_abs, rel=1e-6), pytest.approx(w.mean_abs, rel=1e-6)]
    # unmerging re-quantizes too, and says so once per layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.unmerge_adapter()
    assert len(_rounding_warnings(caught)) == 8


@peft_fast_only
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dequantize_gives_exact_16bit_model(model_dir, case):
    model = make_impl(model_dir, case)
    # The adapter model computing with the dequantized base: in train mode (dropout 0) neither library hands the
    # base to bnb's AVX512-BF16 CPU kernel, which computes in bf16 and repacks the weight.
    model.train()
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
    exact = _exact_merged(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload(dequantize=True)
    assert not _rounding_warnings(caught)
    assert not four_bit(merged)
    assert not getattr(merged, "is_loaded_in_4bit", False)
    assert getattr(merged.config, "quantization_config", None) is None
    mods = dict(merged.named_modules())
    for key, w in exact.items():
        lin = mods[key.removeprefix("base_model.model.")]
        assert type(lin) is torch.nn.Linear and lin.weight.dtype == case[0], key
        assert torch.equal(lin.weight, w.to(case[0])), key  # no rounding beyond the model dtype
    assert type(merged.model.layers[0].self_attn.k_proj) is torch.nn.Linear  # untargeted: dequantized too
    got = logits(merged)
    if case[0] == case[1] == torch.float32:
        assert_close(got, expected, atol=2e-5, rtol=2e-5)
    else:
        assert_close(got, expected, atol=3e-2, rtol=3e-2)  # bf16 weights or a bf16 compute dtype


def _snapshot(model):
    snap = {}
    for n, m in four_bit(model).items():
        data, qs = unpacked(m.weight)
        snap[n] = (data.clone(), qs.absmax.clone())
    return snap


@peft_fast_only
@pytest.mark.parametrize("dequantize", [False, True])
def test_nan_adapter_safe_merge_refused_untouched(model_dir, dequantize):
    case = CASES[0]
    model = make_impl(model_dir, case)
    model.add_adapter("broken", impl.LoraConfig(**lora_kw()))
    last = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        last.lora_B["broken"].weight[0, 0] = float("nan")
    out_before = logits(model)  # "default" only
    before = _snapshot(model)  # after the forward (bnb may repack its CPU weights then)
    model.base_model.set_adapter(["default", "broken"])
    with pytest.raises(ValueError, match="broken"):
        if dequantize:
            model.merge_and_unload(safe_merge=True, dequantize=True)
        else:
            model.merge_adapter(safe_merge=True)
    after = _snapshot(model)
    assert set(after) == set(before)
    for n in before:
        assert torch.equal(after[n][0], before[n][0]) and torch.equal(after[n][1], before[n][1]), n
    assert all(not m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "LoraLinear"
    model.base_model.set_adapter("default")
    assert torch.equal(logits(model), out_before)


@peft_fast_only
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_merging_into_quantized_nf4_layers_gives_peft_bytes_over_bitsandbytes(model_dir, case):
    """`peft_fast.quantize` layers hold bnb's bytes: a merge re-quantizes the promoted sum (float32 adapters over a
    bf16 base: float32) as PEFT does over Linear4bit, so the packed codes, absmax and the state's dtype stay
    bnb's, and the merged model dequantizes to the same weights."""
    from transformers import LlamaForCausalLM

    ref_model, _ = make_pair(model_dir, case)
    dtype, _, double, quant_type = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = impl.quantize(LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype), quant_type=quant_type,
                             double_quant=double)
        model = impl.get_peft_model(base, impl.LoraConfig(**lora_kw()))
    r_p = dict(ref_model.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                assert p.dtype == r_p[n].dtype == torch.float32, n
                p.copy_(r_p[n])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_merged, merged = ref_model.merge_and_unload(), model.merge_and_unload()
    want, got = four_bit(ref_merged), {n: m for n, m in merged.named_modules() if type(m).__name__ == "NF4Linear"}
    assert set(want) == set(got) and want
    for n in want:
        codes, qs = unpacked(want[n].weight)
        assert got[n].quant_state.dtype == qs.dtype, n
        assert torch.equal(got[n].codes(), codes) and torch.equal(got[n].quant_state.absmax, qs.absmax), n
        if qs.nested:
            assert torch.equal(got[n].quant_state.nested_absmax, qs.state2.absmax), n
            assert torch.equal(got[n].quant_state.offset, qs.offset), n
        assert torch.equal(got[n].dequantize(), bnb.functional.dequantize_4bit(codes, qs)), n
