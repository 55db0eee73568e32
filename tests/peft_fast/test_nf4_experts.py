"""4-bit expert stacks (peft_fast.quantize on mixture-of-experts models) and QLoRA on them through target_parameters.

Beyond PEFT: bitsandbytes quantizes nn.Linear layers only, so neither transformers' 4-bit loading nor PEFT has 4-bit
expert stacks. The oracle is the same model with dense stacks holding the dequantized values (and, for LoRA, PEFT on
that dense model): the 4-bit model must compute exactly that."""
import copy
import tempfile

import pytest
import torch
from moe_models import EXPERTS, dense_twin, moe_base, moe_inputs
from switches import hub_kernels_checkpointing
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
    assert_close(q(**x).logits, dense_twin(base, q)(**x).logits, **TOL)


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
    dense = dense_twin(base, q)
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
        dense = dense_twin(moe_base("mixtral", torch.float32), q)(**x).logits
        err = (q(**x).logits - dense).abs().max()
    assert 0 < err < 5e-2 * dense.abs().max()
    llama4 = peft_fast.quantize(moe_base("llama4", torch.float32))  # no routing contract: stacks stay dense
    assert not _experts(llama4) and any(p.dim() == 3 for p in llama4.parameters())


def test_codes_are_frozen_parameters_under_their_own_name_and_count_unpacked():
    """The codes are frozen parameters, `<stack>_nf4`: DDP broadcasts buffers at every step and FSDP2 shards
    parameters only (tests/peft_fast/test_distributed.py runs both). The state dict keeps the stack's own key, the
    stack's name reads it dense, and parameter counts see the stacks (and NF4Linear weights) at their unpacked size,
    as PEFT counts bitsandbytes' 4-bit weights."""
    base, q = _quantized("mixtral")
    e = q.model.layers[0].mlp.experts
    codes = dict(q.named_parameters())["model.layers.0.mlp.experts.gate_up_proj_nf4"]
    assert codes.dtype == torch.uint8 and not codes.requires_grad and codes is e.packed("gate_up_proj")
    assert not any(b.dtype == torch.uint8 for b in q.buffers())
    assert not any(k.endswith("_proj_nf4") for k in q.state_dict())
    assert e.gate_up_proj.shape == base.model.layers[0].mlp.experts.gate_up_proj.shape  # dense, as before
    model = peft_fast.get_peft_model(q, peft_fast.LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable > 0 and total - trainable == sum(p.numel() for p in base.parameters())
    # the codes' parameter is not a LoRA target: it is bytes, and the stack is targeted by its own name
    other = _quantized("mixtral")[1]
    with pytest.raises(ValueError, match="matched no parameter"):
        peft_fast.get_peft_model(other, peft_fast.LoraConfig(target_modules=[],
                                                             target_parameters=["experts.gate_up_proj_nf4"]))


def _train(q, x, steps=2):
    torch.manual_seed(1)
    model = peft_fast.get_peft_model(q, peft_fast.LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS,
                                                             init_lora_weights=False))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        loss = model(**x, labels=x["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return model, torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_stacks_in_a_float_quant_storage_hold_the_same_bytes_and_train_alike(storage):
    """quant_storage applies to the stacks as to the linear layers (FSDP2 on torch 2.11 shards no integer
    parameters): the same bytes in a float tensor, [bytes / itemsize, 1], computing and training bit for bit as
    uint8 codes do, and merging re-quantizes into the same storage."""
    base = moe_base("mixtral", torch.float32)
    u8 = peft_fast.quantize(copy.deepcopy(base))
    fl = peft_fast.quantize(copy.deepcopy(base), quant_storage=storage)
    e8, ef = u8.model.layers[1].mlp.experts, fl.model.layers[1].mlp.experts
    for n in e8._nf4_names:
        p = ef._parameters[f"{n}_nf4"]
        assert p.dtype == storage and tuple(p.shape) == (e8.packed(n).numel() // storage.itemsize, 1)
        assert ef.packed(n).dtype == torch.uint8 and torch.equal(ef.packed(n), e8.packed(n))
    assert "quant_storage=" + str(storage).removeprefix("torch.") in repr(ef)
    x = moe_inputs()
    (m8, l8, w8), (mf, lf, wf) = _train(u8, x), _train(fl, x)
    assert torch.equal(l8, lf) and lf[1] < lf[0]
    assert w8.keys() == wf.keys() and all(torch.equal(w8[k], wf[k]) for k in w8)
    a, b = m8.merge_and_unload(), mf.merge_and_unload()
    stacks = [m for m in b.modules() if is_nf4_experts(m)]
    assert stacks and all(m._parameters[f"{n}_nf4"].dtype == storage for m in stacks for n in m._nf4_names)
    assert torch.equal(a(**x).logits, b(**x).logits)


def test_casts_and_kbit_preparation_keep_float_stored_stacks():
    q = peft_fast.quantize(moe_base("mixtral", torch.bfloat16), quant_storage=torch.bfloat16)
    e = q.model.layers[0].mlp.experts
    codes = {n: e.packed(n).clone() for n in e._nf4_names}

    def kept():
        return all(e._parameters[f"{n}_nf4"].dtype == torch.bfloat16 and torch.equal(e.packed(n), c)
                   for n, c in codes.items())

    for cast in (torch.nn.Module.half, torch.nn.Module.float, torch.nn.Module.bfloat16,
                 lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.float32)):
        cast(q)
        assert kept()
    q.to(torch.bfloat16)
    peft_fast.prepare_model_for_kbit_training(q)
    assert q.model.embed_tokens.weight.dtype == torch.float32 and kept()  # the other bf16 weights are upcast
    # a cast nothing guards (PEFT's own kbit preparation, an FSDP2 param_dtype) is named, not computed with
    e._parameters["down_proj_nf4"].data = e._parameters["down_proj_nf4"].data.float()
    with pytest.raises(RuntimeError, match="down_proj: its 4-bit codes are stored as bfloat16 but the weight is now "
                                           "float32.*param_dtype"):
        q(**moe_inputs())


@pytest.mark.parametrize("how", ["meta", "overwrite"])
def test_conversions_that_replace_the_parameters_keep_the_storage(how):
    """`.to("meta")` (Accelerate's FSDP2 cpu_ram_efficient_loading) and torch's overwrite-on-conversion mode put
    new parameter objects in the module: the storage is restored on those, not on the ones they replaced."""
    q = peft_fast.quantize(moe_base("mixtral", torch.float32), quant_storage=torch.bfloat16)
    e = q.model.layers[0].mlp.experts
    codes = {n: e.packed(n).clone() for n in e._nf4_names}
    old = {n: e._parameters[f"{n}_nf4"] for n in e._nf4_names}
    if how == "meta":
        q.to("meta")
    else:
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            q.half()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(False)
    for n in e._nf4_names:
        p = e._parameters[f"{n}_nf4"]
        assert p is not old[n] and p.dtype == torch.bfloat16 and p.device == e._nf4_states[n].absmax.device
        if how == "overwrite":
            assert torch.equal(e.packed(n), codes[n])
    if how == "meta":
        assert e._nf4_states["down_proj"].absmax.is_meta and e.packed("down_proj").is_meta


def test_state_dict_keys_resolve_for_distributed_checkpoint_and_the_codes_name_is_not_a_key():
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    q = peft_fast.quantize(moe_base("mixtral", torch.float32))
    e = q.model.layers[0].mlp.experts
    sd = get_model_state_dict(q)  # resolves every key as an attribute path (_fqn_modifiers)
    assert sd.keys() == q.state_dict().keys() and torch.equal(sd["model.layers.0.mlp.experts.down_proj"],
                                                              e.packed("down_proj"))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    bad = dict(q.state_dict())
    del bad["model.layers.0.mlp.experts.down_proj"]  # the codes' name alone would pair these bytes with a stale state
    bad["model.layers.0.mlp.experts.down_proj_nf4"] = torch.zeros_like(e.packed("down_proj"))
    with pytest.raises(RuntimeError, match='Unexpected key.*"model.layers.0.mlp.experts.down_proj_nf4"'):
        q.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())
    # beside the stack's key (set_model_state_dict adds the named parameters to what it loads) the stack's key loads
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    other = peft_fast.quantize(moe_base("mixtral", torch.float32), quant_storage=torch.bfloat16, blocksize=128)
    src = peft_fast.quantize(moe_base("mixtral", torch.float32), quant_storage=torch.bfloat16)
    full = StateDictOptions(full_state_dict=True)
    assert not set_model_state_dict(other, get_model_state_dict(src, options=full), options=full).unexpected_keys
    x = moe_inputs()
    assert torch.equal(other(**x).logits, src(**x).logits)


def test_save_and_load_keep_or_change_the_stacks_storage(tmp_path):
    q = peft_fast.quantize(moe_base("mixtral", torch.float32), quant_storage=torch.float32)
    x = moe_inputs()
    want = q(**x).logits
    save_quantized(q, str(tmp_path), {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                      "compute_dtype": None})
    for storage, dtype in ((None, torch.float32), (torch.uint8, torch.uint8), ("bfloat16", torch.bfloat16)):
        loaded = load_quantized(str(tmp_path), quant_storage=storage)  # None: the checkpoint's
        e = loaded.model.layers[0].mlp.experts
        assert all(e._parameters[f"{n}_nf4"].dtype == dtype for n in e._nf4_names), storage
        assert torch.equal(loaded(**x).logits, want)
    # a model whose stacks and linear layers store their codes differently is refused before anything is written
    mixed = peft_fast.quantize(moe_base("mixtral", torch.float32), experts=False, quant_storage=torch.float32)
    peft_fast.bases.nf4_experts.quantize_experts(mixed.model.layers[0].mlp.experts)
    with pytest.raises(ValueError, match=r"several dtypes \(\['float32', 'uint8'\]\)"):
        save_quantized(mixed, str(tmp_path / "mixed"), {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                                        "compute_dtype": None})
    assert not (tmp_path / "mixed").exists()


def test_a_stack_its_storage_cannot_hold_is_refused_before_anything_changes():
    model = moe_base("mixtral", torch.float32)
    model.model.layers[1].mlp.experts.down_proj = torch.nn.Parameter(torch.randn(3, 5, 7))  # 53 bytes of codes
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.down_proj's \(3, 5, 7\) stack packs into 53 bytes"):
        peft_fast.quantize(model, quant_storage=torch.bfloat16)
    assert not _experts(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("storage,checkpointing", [(torch.uint8, False), (torch.bfloat16, True)],
                         ids=["uint8", "bfloat16-checkpointing"])
def test_compiled_training_step_over_4bit_stacks_is_one_graph(storage, checkpointing):
    """torch.compile of a QLoRA step over 4-bit stacks, after an eager step (whose cached byte views must not trip
    the compiled one, nor be written from inside a checkpointed region): no graph break, eager's loss and
    gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q = peft_fast.quantize(moe_base("mixtral", torch.float32), quant_storage=storage)
    model = peft_fast.get_peft_model(q, peft_fast.LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS,
                                                             init_lora_weights=False))
    if checkpointing:
        q.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        q.disable_input_require_grads()  # its hook is one graph break, with PEFT alike (test_compiled_training.py)
    x = moe_inputs()

    def step(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    step(x["input_ids"]).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    want_loss = step(x["input_ids"]).detach()
    model.zero_grad()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with hub_kernels_checkpointing(model):
        loss = torch.compile(step, fullgraph=True, backend=counter)(x["input_ids"])
    loss.backward()
    assert counter.frame_count == 1
    assert_close(loss.detach(), want_loss, atol=1e-6, rtol=1e-6)
    for n, w in want.items():
        assert_close(dict(model.named_parameters())[n].grad, w, **TOL, msg=n)
