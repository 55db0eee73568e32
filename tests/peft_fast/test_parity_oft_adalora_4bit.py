"""OFT and AdaLoRA over 4-bit bases against PEFT 0.21.2: bitsandbytes Linear4bit layers loaded by transformers
(qlora_models.CASES: float32 and bf16 models, nf4 and fp4, double quantization, a bf16 compute dtype under a
float32 model), and peft_fast's own NF4Linear (the same bytes, made by peft_fast.quantize).

PEFT runs both types on 4-bit layers. OFT rotates the input of the 4-bit layer and merges as it merges dense
layers, through a dequantize / rotate / re-quantize round (the same packed bytes here); AdaLoRA adds its delta in
PEFT's 4-bit order and cannot merge there (PEFT raises NotImplementedError; peft_fast refuses up front, with the
model unchanged).
"""
import warnings

import pytest
import torch
from oft_adalora_pairs import make_4bit_pair, nf4_twin
from tiny_models import assert_close, assert_same_state, assert_unchanged, impl, loss_of, peft_fast_only, ref, \
    snapshot

bnb = pytest.importorskip("bitsandbytes")
from qlora_models import CASES, IDS, ids, load4, save_tiny_llama  # noqa: E402

TUNERS = ["oft", "adalora"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_oft_adalora"))


def _tol(case):
    return {"atol": 1e-5, "rtol": 1e-5} if case[0] == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def _grads(model) -> dict:
    # PEFT's AdaLoRA `ranknum` loses its requires_grad=False when moved to a 16-bit compute dtype (a deliberate
    # difference: test_parity_adalora.py::test_ranknum_stays_frozen_in_16bit_models): its gradient is not compared.
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".ranknum." not in n}


def _assert_same_4bit_state(r, i) -> None:
    """The same packed bytes; absmax within a float32 ulp (PEFT rotates with one dense block-diagonal matmul,
    peft_fast block by block: the exact merged weights differ by float rounding, the re-quantized bytes do not)."""
    rs, is_ = r.state_dict(), i.state_dict()
    assert set(rs) == set(is_)
    for k, v in rs.items():
        if k.endswith(("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")):
            continue  # the serialized quant state: its numbers are the absmax compared here
        if v.dtype == torch.uint8:
            assert torch.equal(is_[k], v), k
        else:
            assert_close(is_[k], v, atol=1e-7, rtol=1e-6, msg=k)


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_4bit_forward_and_gradients(model_dir, case, tuner):
    r, i = make_4bit_pair(tuner, model_dir, case)
    assert [s.module_type for s in i.get_layer_status()] == [s.module_type for s in r.get_layer_status()]
    assert_same_state(r, i, atol=0, rtol=0)  # the same initial (perturbed) adapters and packed bases
    x = ids()
    for mode in ("train", "eval"):
        r.train(mode == "train"), i.train(mode == "train")
        ro, io = r(input_ids=x, labels=x), i(input_ids=x, labels=x)
        assert io.logits.dtype == ro.logits.dtype
        assert_close(io.logits.float(), ro.logits.float(), **_tol(case), msg=mode)
    ro.loss.backward(), io.loss.backward()
    rg, ig = _grads(r), _grads(i)
    assert set(rg) == set(ig) and rg
    for n in rg:
        assert_close(ig[n].float(), rg[n].float(), **_tol(case), msg=n)


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_oft_4bit_merge_unmerge_and_unload_requantize_as_peft(model_dir, case):
    r, i = make_4bit_pair("oft", model_dir, case, init_weights=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # peft_fast reports the re-quantization's rounding
        for m in (r, i):
            m.merge_adapter()
        _assert_same_4bit_state(r, i)
        for m in (r, i):
            m.unmerge_adapter()
        _assert_same_4bit_state(r, i)
        _assert_same_4bit_state(r.merge_and_unload(), i.merge_and_unload())


def test_adalora_4bit_merge_is_refused_as_in_peft(model_dir):
    r, i = make_4bit_pair("adalora", model_dir, CASES[0])
    snap = snapshot(i)
    for model in (r, i):
        with pytest.raises(NotImplementedError):
            model.merge_adapter()
        with pytest.raises(NotImplementedError):
            model.merge_and_unload()
    if impl is not ref:  # all or nothing
        assert_unchanged(i, snap)


@pytest.mark.parametrize("tuner", TUNERS)
def test_4bit_files_both_ways(model_dir, tmp_path, tuner):
    r, i = make_4bit_pair(tuner, model_dir, CASES[0])
    i.save_pretrained(tmp_path / "impl")
    r.save_pretrained(tmp_path / "ref")
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_impl = ref.PeftModel.from_pretrained(load4(model_dir, CASES[0]), str(tmp_path / "impl"))
        from_ref = type(i).from_pretrained(load4(model_dir, CASES[0]), str(tmp_path / "ref"))
    r.eval()
    with torch.no_grad():
        want = r(input_ids=x).logits
        assert_close(from_impl(input_ids=x).logits, want)
        assert_close(from_ref(input_ids=x).logits, want)


@peft_fast_only
@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_nf4linear_base_equals_peft_over_bitsandbytes(model_dir, case, tuner):
    """PEFT has no NF4Linear: peft_fast over its own 4-bit layers gives PEFT's results over bitsandbytes' layers
    holding the same bytes (training, eval, and OFT's merge)."""
    r, i = make_4bit_pair(tuner, model_dir, case)
    twin = nf4_twin(tuner, model_dir, case, i)
    x = {"input_ids": ids()}
    r.train(), twin.train()
    ref_loss, twin_loss = loss_of(r, x), loss_of(twin, x)
    assert_close(twin_loss, ref_loss, **_tol(case))
    ref_loss.backward(), twin_loss.backward()
    rg, tg = _grads(r), _grads(twin)
    for n in rg:
        assert_close(tg[n].float(), rg[n].float(), **_tol(case), msg=n)
    # PEFT's side stays in train mode (no dropout in these models: the same math): in eval mode, with an input
    # that needs no gradient, bitsandbytes repacks the weight for its own CPU inference kernel, which rounds
    # differently from its dequantize-and-matmul. peft_fast's side runs its eval path.
    twin.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(loss_of(twin, x), ref_loss, **_tol(case))
        if tuner == "oft":
            r.merge_adapter(), twin.merge_adapter()
            got = loss_of(twin, x)
    if tuner == "oft":
        assert_close(got, loss_of(r, x), **_tol(case))
