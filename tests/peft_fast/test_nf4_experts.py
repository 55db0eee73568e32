"""4-bit expert stacks (peft_fast.quantize on mixture-of-experts models) and QLoRA on them through target_parameters.

Beyond PEFT: bitsandbytes quantizes nn.Linear layers only, so neither transformers' 4-bit loading nor PEFT has 4-bit
expert stacks. The oracle is the same model with dense stacks holding the dequantized values (and, for LoRA, PEFT on
that dense model): the 4-bit model must compute exactly that."""
import copy
import tempfile

import pytest
import torch
from moe_models import EXPERTS, moe_base, moe_inputs
from tiny_models import assert_close, peft_fast_only, ref

import peft_fast
from peft_fast.bases.checkpoint import load_quantized, save_quantized
from peft_fast.bases.nf4_experts import is_nf4_experts
from peft_fast.kernels import nf4_quantize

pytestmark = peft_fast_only
KINDS = ["mixtral", "gpt_oss"]
TOL = dict(atol=2e-5, rtol=2e-5)


def _quantized(kind):
    base = moe_base(kind, torch.float32)
    return base, peft_fast.quantize(copy.deepcopy(base))


def _dense_twin(base, quantized):
    """`base` with every 4-bit weight of `quantized` replaced by its dequantized values."""
    dense = copy.deepcopy(base)
    for name, m in quantized.named_modules():
        if is_nf4_experts(m):
            for n in m._nf4_names:
                getattr(dense.get_submodule(name), n).data = m.dequantize(n).float()
        elif type(m).__name__ == "NF4Linear":
            dense.get_submodule(name).weight.data = m.dequantize().float()
    return dense


def _experts(model):
    return [m for m in model.modules() if is_nf4_experts(m)]


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_stores_the_stacks_in_4_bits_and_computes_the_dequantized_model(kind):
    base, q = _quantized(kind)
    experts = _experts(q)
    assert experts and all(type(m).__name__.startswith("NF4") for m in experts)
    stack = base.model.layers[0].mlp.experts.gate_up_proj
    packed, _ = nf4_quantize(stack.detach(), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(experts[0].packed("gate_up_proj"), packed)  # bitsandbytes' bytes for that tensor
    assert not any(p.dim() == 3 for p in q.parameters())
    x = moe_inputs()
    assert_close(q(**x).logits, _dense_twin(base, q)(**x).logits, **TOL)


def test_state_dict_and_checkpoint_round_trip():
    base, q = _quantized("mixtral")
    x = moe_inputs()
    want = q(**x).logits
    keys = q.state_dict().keys()
    assert "model.layers.0.mlp.experts.gate_up_proj.quant_state.bitsandbytes__nf4" in keys
    other = peft_fast.quantize(moe_base("mixtral", torch.float32), blocksize=128)  # different bytes and blocks
    other.load_state_dict(q.state_dict())
    assert_close(other(**x).logits, want, atol=0, rtol=0)
    with tempfile.TemporaryDirectory() as d:
        save_quantized(q, d, {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": None})
        loaded = load_quantized(d)
    assert _experts(loaded) and torch.equal(loaded(**x).logits, want)
    bad = dict(q.state_dict())
    bad["model.layers.0.mlp.experts.down_proj"] = bad["model.layers.0.mlp.experts.down_proj"][:-2]
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match="does not fit"):
        other.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("kind", KINDS)
def test_qlora_on_4bit_experts_equals_peft_on_the_dequantized_model(kind):
    base, q = _quantized(kind)
    dense = _dense_twin(base, q)
    spare = copy.deepcopy(dense)
    kw = dict(target_modules=["q_proj"], target_parameters=list(EXPERTS), r=3, lora_alpha=6, init_lora_weights=False)
    torch.manual_seed(1)
    theirs = ref.get_peft_model(dense, ref.LoraConfig(**kw))
    mine = peft_fast.get_peft_model(q, peft_fast.LoraConfig(**kw))
    mine.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    x = moe_inputs()
    a, b = theirs(**x, labels=x["input_ids"]), mine(**x, labels=x["input_ids"])
    assert_close(b.logits, a.logits, **TOL)
    a.loss.backward()
    b.loss.backward()
    grads = {n: p.grad for n, p in mine.named_parameters() if p.requires_grad}
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            assert_close(grads[n], p.grad, **TOL, msg=n)
    with tempfile.TemporaryDirectory() as d:
        mine.save_pretrained(d)
        back = ref.PeftModel.from_pretrained(spare, d)
    assert_close(back(**x).logits, a.logits, **TOL)


def test_training_keeps_no_dense_copy_of_the_stacks():
    """Between forward and backward only the packed codes of a stack are kept (it is dequantized again)."""
    base, q = _quantized("mixtral")
    model = peft_fast.get_peft_model(q, peft_fast.LoraConfig(target_modules=[], target_parameters=list(EXPERTS)))
    stacks = {s.nf4_state(n).shape.numel() for s in _experts(model) for n in s._nf4_names}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(**moe_inputs(), labels=moe_inputs()["input_ids"]).loss
    loss.backward()
    dense = [tuple(t.shape) for t in saved if t.dtype.is_floating_point and t.numel() in stacks]
    assert saved and not dense, f"dense stack-sized tensors kept for the backward: {dense}"


def test_merging_requantizes_and_dequantize_true_gives_dense_exact_stacks():
    base, q = _quantized("mixtral")
    model = peft_fast.get_peft_model(q, peft_fast.LoraConfig(target_modules=[], target_parameters=list(EXPERTS),
                                                             init_lora_weights=False))
    x = moe_inputs()
    want = model(**x).logits
    exact = copy.deepcopy(model).merge_and_unload(dequantize=True)
    assert not _experts(exact) and type(exact.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert_close(exact(**x).logits, want, **TOL)
    requantized = copy.deepcopy(model).merge_and_unload()
    assert _experts(requantized)
    err = (requantized(**x).logits - want).abs().max()
    assert 0 < err < 0.5 * want.abs().max()  # 4-bit rounding of the merged stacks, as for 4-bit linear layers


def test_refusals_leave_the_model_as_it_was():
    model = moe_base("mixtral", torch.float64)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        peft_fast.quantize(model)
    assert not _experts(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    kept = peft_fast.quantize(moe_base("mixtral", torch.float32), experts=False)
    assert not _experts(kept) and any(p.dim() == 3 for p in kept.parameters())


def test_pickle_compute_dtype_and_modules_outside_the_contract():
    import io

    q = peft_fast.quantize(moe_base("mixtral", torch.float32), compute_dtype=torch.bfloat16)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = moe_inputs()
    assert torch.equal(again(**x).logits, q(**x).logits)
    assert again.model.layers[0].mlp.experts.nf4_compute_dtype == torch.bfloat16
    with torch.no_grad():  # the grouped matmuls run in bf16: close to the float32 model, not equal
        dense = _dense_twin(moe_base("mixtral", torch.float32), q)(**x).logits
        err = (q(**x).logits - dense).abs().max()
    assert 0 < err < 5e-2 * dense.abs().max()
    llama4 = peft_fast.quantize(moe_base("llama4", torch.float32))  # no routing contract: stacks stay dense
    assert not _experts(llama4) and any(p.dim() == 3 for p in llama4.parameters())
