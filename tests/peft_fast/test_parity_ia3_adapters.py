"""(IA)³ against PEFT 0.21.2: merging and unloading, several adapters (set / disable / delete / weighted), 4-bit
bases (bitsandbytes, and peft_fast's NF4Linear), and refusals that leave the model as it was."""
import warnings

import pytest
import torch
from safetensors.torch import save_file

from ia3_vera_pairs import IA3Config, add_both, grads, make_4bit_pair, make_pair
from tiny_models import (
    AGAINST_PEFT, assert_close, assert_same_state, assert_unchanged, base_model, impl, inputs, loss_of, out,
    peft_fast_only, raises_like_peft, snapshot,
)

KINDS = ["llama", "gpt2", "mlp"]


def _eval_pair(kind, **kw):
    _, r, i = make_pair("ia3", kind, **kw)
    r.eval(), i.eval()
    return r, i


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_as_peft(kind, safe):
    r, i = _eval_pair(kind)
    x = inputs(kind)
    want = out(r, x)
    for m in (r, i):
        m.merge_adapter(safe_merge=safe)
    assert_same_state(r, i, atol=0, rtol=0)  # weight (and an output-scaled layer's bias) times the vector
    assert_close(out(i, x), want)
    for m in (r, i):
        with pytest.warns(UserWarning, match="inaccurate"):
            m.unmerge_adapter()
    assert_same_state(r, i, atol=0, rtol=0)  # divided by vector + 1e-8, as PEFT
    assert_close(out(i, x), want)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_and_unload(kind):
    r, i = _eval_pair(kind)
    x = inputs(kind)
    want = out(r, x)
    merged_r, merged_i = r.merge_and_unload(), i.merge_and_unload()
    assert_same_state(merged_r, merged_i, atol=0, rtol=0)
    assert_close(out(merged_i, x), want)
    r, i = _eval_pair(kind)
    plain = i.unload()
    assert_same_state(r.unload(), plain, atol=0, rtol=0)
    assert_close(out(plain, x), out(base_model(kind).eval(), x))


def test_merge_named_adapters_only():
    r, i = _eval_pair("llama")
    add_both("ia3", r, i, "other", "llama", target_modules=["k_proj", "down_proj"])
    for m in (r, i):
        m.merge_adapter(adapter_names=["other"])
    assert_same_state(r, i, atol=0, rtol=0)
    x = inputs("llama")
    assert_close(out(i, x), out(r, x))  # merged "other" plus nothing else: PEFT skips the unmerged active ones


def test_set_disable_delete_as_peft():
    r, i = _eval_pair("llama")
    add_both("ia3", r, i, "other", "llama", target_modules=["k_proj", "down_proj"])
    x = inputs("llama")
    for m in (r, i):
        m.set_adapter("other")
    assert_close(out(i, x), out(r, x))
    assert sorted(n for n, p in i.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in r.named_parameters() if p.requires_grad)
    with r.disable_adapter(), i.disable_adapter():
        assert_close(out(i, x), out(r, x))
        assert_close(out(i, x), out(base_model("llama").eval(), x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (r, i):
            m.delete_adapter("other")
    assert i.active_adapters == r.active_adapters == ["default"]
    assert_same_state(r, i, atol=0, rtol=0)
    assert_close(out(i, x), out(r, x))


def test_add_weighted_adapter_as_peft():
    r, i = _eval_pair("llama")
    add_both("ia3", r, i, "other", "llama", target_modules=["q_proj", "k_proj", "down_proj"])
    for m in (r, i):
        m.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix")
        m.set_adapter("mix")
    assert set(i.peft_config["mix"].target_modules) == set(r.peft_config["mix"].target_modules)
    assert_same_state(r, i, atol=0, rtol=0)
    x = inputs("llama")
    assert_close(out(i, x), out(r, x))


def test_broken_adapter_refused_by_safe_merge_untouched():
    r, i = _eval_pair("mlp")
    for m in (r, i):
        with torch.no_grad():
            m.base_model.model.lin1.ia3_l["default"][0, 0] = float("inf")
    snap = snapshot(i)
    raises_like_peft(ValueError, ["NaN"], lambda: i.merge_adapter(safe_merge=True),
                     lambda: r.merge_adapter(safe_merge=True))
    if not AGAINST_PEFT:  # peft_fast's guarantee: PEFT has merged lin0 by the time lin1 is refused
        assert_unchanged(i, snap)


@peft_fast_only
def test_refused_loads_and_adds_leave_the_model_as_it_was(tmp_path):
    _, _, i = make_pair("ia3", "llama")
    i.save_pretrained(tmp_path)
    name = "base_model.model.model.layers.0.self_attn.q_proj.ia3_l"
    tensors = {name: torch.ones(1, 64)}  # q_proj is output-scaled here: its vector is (64, 1); and keys are missing
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    snap = snapshot(i)
    with pytest.raises(ValueError, match="do not fit"):
        i.load_adapter(str(tmp_path), adapter_name="wrong")
    assert_unchanged(i, snap)
    with pytest.raises(ValueError, match="not found"):
        i.add_adapter("nothing", IA3Config(target_modules=["no_such_module"], feedforward_modules=[]))
    assert_unchanged(i, snap)



def test_layer_and_model_status_as_peft():
    import dataclasses

    r, i = _eval_pair("llama")
    add_both("ia3", r, i, "other", "llama", target_modules=["q_proj", "k_proj", "down_proj"])
    for m in (r, i):
        m.base_model.set_adapter(["default", "other"])
        m.merge_adapter(["other"])
    layers = [[dataclasses.asdict(s) for s in m.get_layer_status()] for m in (i, r)]
    assert layers[0] == layers[1]
    assert dataclasses.asdict(i.get_model_status()) == dataclasses.asdict(r.get_model_status())

# --- 4-bit bases --------------------------------------------------------------------------------------------------
bnb = pytest.importorskip("bitsandbytes")
from qlora_models import CASES, IDS, ids, save_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_ia3"))


def _tol(case):
    return {"atol": 1e-5, "rtol": 1e-5} if case[0] == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def _outputs_in_input_dtype(peft_model):
    """PEFT's 4-bit IA3 layers with their output cast back to their input's dtype, as peft_fast's are."""
    for m in peft_model.modules():
        if type(m).__name__ == "Linear4bit" and hasattr(m, "ia3_l"):
            m.register_forward_hook(lambda mod, inp, o: o.to(inp[0].dtype))


def test_peft_4bit_ia3_breaks_a_bf16_model(model_dir):
    # PEFT's ia3.Linear4bit runs a bf16 input in float32 and returns float32: the next bf16 layer then refuses it.
    if AGAINST_PEFT:
        pytest.skip("shows PEFT's failure that peft_fast deliberately avoids")
    r, i = make_4bit_pair("ia3", model_dir, CASES[2])
    with pytest.raises(RuntimeError, match="dtype"):
        r(input_ids=ids())
    assert i(input_ids=ids()).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_4bit_forward_and_gradients(model_dir, case):
    r, i = make_4bit_pair("ia3", model_dir, case)
    if case[0] != torch.float32:  # the deliberate difference above; everything else is PEFT's computation
        _outputs_in_input_dtype(r)
        if AGAINST_PEFT:
            _outputs_in_input_dtype(i)
    r.train(), i.train()
    x = ids()
    ro, io = r(input_ids=x, labels=x), i(input_ids=x, labels=x)
    assert io.logits.dtype == ro.logits.dtype
    assert_close(io.logits.float(), ro.logits.float(), **_tol(case))
    ro.loss.backward(), io.loss.backward()
    rg, ig = grads(r), grads(i)
    assert set(rg) == set(ig) and rg
    for n in rg:
        assert_close(ig[n].float(), rg[n].float(), **_tol(case), msg=n)


def test_4bit_files_from_peft(model_dir, tmp_path):
    from qlora_models import load4

    r, _ = make_4bit_pair("ia3", model_dir, CASES[0])
    r.save_pretrained(tmp_path)
    loaded = impl.PeftModel.from_pretrained(load4(model_dir, CASES[0]), str(tmp_path), is_trainable=True)
    x = ids()
    assert_close(loaded(input_ids=x).logits, r(input_ids=x).logits)


@peft_fast_only
@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_nf4linear_base_equals_peft_over_bitsandbytes(model_dir, case):
    from transformers import LlamaForCausalLM

    import peft_fast

    r, i = make_4bit_pair("ia3", model_dir, case)
    _outputs_in_input_dtype(r)
    dtype, compute, double, qt = case
    ours = peft_fast.quantize(LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype), quant_type=qt,
                              double_quant=double, compute_dtype=compute)
    nf4 = impl.get_peft_model(ours, i.peft_config["default"])
    nf4.load_state_dict({k: v for k, v in i.state_dict().items() if "ia3_l" in k}, strict=False)
    x = ids()
    assert_close(loss_of(nf4, {"input_ids": x}), loss_of(r, {"input_ids": x}), **_tol(case))


def test_peft_refuses_to_merge_ia3_into_4bit(model_dir):
    r, _ = make_4bit_pair("ia3", model_dir, CASES[0])
    with pytest.raises(ValueError, match="4-bit"):
        r.merge_and_unload()


@peft_fast_only
def test_4bit_merge_requantizes_and_unload_works(model_dir):
    # Deliberate difference: PEFT refuses both (test above). peft_fast merges as it merges LoRA into 4-bit bases
    # (dequantize, scale, re-quantize, with the rounding reported), and unload() needs no merge at all.
    from peft_fast import QuantizedMergeWarning

    r, i = make_4bit_pair("ia3", model_dir, CASES[0])
    x = ids()
    want = r(input_ids=x).logits
    with pytest.warns(QuantizedMergeWarning):
        merged = i.merge_and_unload()
    assert_close(merged(input_ids=x).logits, want, atol=0.1, rtol=0.1)  # within NF4 rounding of the merged weights
    _, i = make_4bit_pair("ia3", model_dir, CASES[0])
    plain = i.unload()
    assert not AGAINST_PEFT and type(plain.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
