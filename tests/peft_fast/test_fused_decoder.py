"""The fused decoder (peft_fast.fuse, fused= of get_peft_model/patch) against the same model unfused: losses,
gradients and logits on tiny models of every family it covers, through the torch.compile backend (the Liger
backend's kernels are checked in test_fused_ops.py, and on a GPU by bench/gpu_check.sh)."""
import copy
import warnings

import pytest
import torch
from decoder_families import FAMILIES, GLU_PER_LAYER, NORMS_PER_LAYER, tiny_causal_lm
from tiny_models import peft_fast_only

import peft_fast
from peft_fast.fused import patching

pytestmark = peft_fast_only

# gate_proj with up_proj: on a mixture-of-experts model both become the experts' fused gate_up_proj (PEFT's
# conversion of a new adapter refuses one without the other)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"], init_lora_weights=False)


def _pair(family, fused="compile", dtype=torch.float32, **lora):
    base = tiny_causal_lm(family, dtype=dtype)
    plain = peft_fast.get_peft_model(copy.deepcopy(base), peft_fast.LoraConfig(**{**LORA, **lora}))
    fast = peft_fast.get_peft_model(base, peft_fast.LoraConfig(**{**LORA, **lora}), fused=fused)
    fast.load_state_dict(plain.state_dict())  # the same random LoRA weights
    return plain, fast


def _loss_and_grads(model, ids, **kw):
    model.train()
    loss = model(input_ids=ids, labels=ids, **kw).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_grads(got, want, atol, rtol):
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=name)


def _assert_same_step(plain, fast, ids, loss_tol=1e-5, atol=1e-5, rtol=1e-4):
    """The unfused and fused models' training losses and gradients on ids; returns the fused model's gradients."""
    want_loss, want = _loss_and_grads(plain, ids)
    got_loss, got = _loss_and_grads(fast, ids)
    torch.testing.assert_close(got_loss, want_loss, atol=loss_tol, rtol=loss_tol)
    _assert_grads(got, want, atol=atol, rtol=rtol)
    return got


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loss_gradients_and_logits_match_unfused(family):
    plain, fast = _pair(family)
    layers = plain.config.num_hidden_layers
    assert patching.family_of(fast.base_model.model) == family
    glu = layers * GLU_PER_LAYER.get(family, 1)
    assert peft_fast.fused_parts(fast) == {"rms_norm": layers * NORMS_PER_LAYER[family] + 1, "rope": layers,
                                           "loss": 1, **({"glu": glu} if glu else {})}
    ids = torch.randint(0, plain.config.vocab_size, (2, 37))
    ids[0, :5] = -100  # ignored labels
    labels_ids = ids.clamp_min(0)
    want_loss, want = _loss_and_grads(plain, labels_ids)
    got_loss, got = _loss_and_grads(fast, labels_ids)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    _assert_grads(got, want, atol=1e-5, rtol=1e-4)
    assert "lm_head.weight" not in want  # the head is frozen under LoRA: no gradient is made for it
    fast.eval(), plain.eval()
    with torch.no_grad():  # without labels (and in eval mode) the logits are returned, as unfused
        torch.testing.assert_close(fast(input_ids=labels_ids).logits, plain(input_ids=labels_ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_training_output_has_no_logits_and_tuples_keep_the_order():
    plain, fast = _pair("llama")
    fast.train()
    ids = torch.randint(0, 211, (2, 9))
    out = fast(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss is not None
    as_tuple = fast(input_ids=ids, labels=ids, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)


def test_trainer_loss_arguments_match_unfused():
    """num_items_in_batch (gradient accumulation), shift_labels and ignore_index as transformers' loss takes them."""
    plain, fast = _pair("qwen2")
    ids = torch.randint(0, 211, (3, 11))
    labels = ids.clone()
    labels[1, 3:] = -100
    for kw in ({"num_items_in_batch": torch.tensor(41)}, {"num_items_in_batch": 17},
               {"shift_labels": torch.roll(labels, -1, 1)}, {"ignore_index": 7}):
        plain.train(), fast.train()
        target = ids if "ignore_index" in kw else labels  # transformers cannot take -100 with another ignore_index
        want_loss = plain(input_ids=ids, labels=target, **kw).loss
        got_loss = fast(input_ids=ids, labels=target, **kw).loss
        torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5, msg=str(kw))


def test_gradient_checkpointing_dropout_and_4bit_base_match_unfused():
    base = peft_fast.quantize(tiny_causal_lm("llama"), quant_type="nf4", compute_dtype=torch.float32)
    cfg = peft_fast.LoraConfig(**{**LORA, "target_modules": "all-linear", "lora_dropout": 0.1})
    plain = peft_fast.get_peft_model(copy.deepcopy(base), cfg)
    fast = peft_fast.get_peft_model(base, cfg, fused="compile")
    fast.load_state_dict(plain.state_dict())
    for m in (plain, fast):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 211, (2, 13))
    torch.manual_seed(3)
    want_loss, want = _loss_and_grads(plain, ids)
    torch.manual_seed(3)  # the fused parts draw no random numbers: the same dropout masks follow
    got_loss, got = _loss_and_grads(fast, ids)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    _assert_grads(got, want, atol=1e-5, rtol=1e-4)


def test_bf16_model_matches_within_bf16_rounding():
    plain, fast = _pair("gemma", dtype=torch.bfloat16)
    ids = torch.randint(0, 211, (2, 21))
    _assert_same_step(plain, fast, ids, loss_tol=2e-2, atol=2e-2, rtol=5e-2)


def test_fuse_works_without_adapters_and_unfuse_reverts():
    model = tiny_causal_lm("mistral")
    plain = copy.deepcopy(model)
    peft_fast.fuse(model, "compile")
    got = _assert_same_step(plain, model, torch.randint(0, 211, (2, 8)))
    assert "lm_head.weight" in got  # a trainable head gets its gradient from the fused loss
    peft_fast.unfuse(model)
    assert not peft_fast.fused_parts(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]


def test_fusing_one_model_leaves_others_of_its_class_alone_and_deepcopy_rebinds():
    fused, other = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    peft_fast.fuse(fused, "compile")
    assert not peft_fast.fused_parts(other)
    twin = copy.deepcopy(fused)
    assert peft_fast.fused_parts(twin) == peft_fast.fused_parts(fused)
    assert twin.model.norm.forward.__self__ is twin.model.norm
    assert twin.model.layers[0].mlp.forward.__self__ is twin.model.layers[0].mlp


def test_unsupported_architecture_falls_back_with_a_warning():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        want = model(ids).logits
    with pytest.warns(UserWarning, match="fuses the decoders of llama"):
        peft_fast.fuse(model, "compile")
    assert not peft_fast.fused_parts(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want)


@pytest.mark.parametrize("fused,error,words", [("fast", ValueError, "not a fused-decoder backend"),
                                               ("liger", ValueError, "need CUDA tensors")])
def test_a_backend_that_cannot_run_is_refused_before_the_model_changes(fused, error, words):
    if fused == "liger":
        pytest.importorskip("liger_kernel")
    model = tiny_causal_lm("llama")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(error, match=words):
        peft_fast.get_peft_model(model, peft_fast.LoraConfig(**LORA), fused=fused)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert not peft_fast.fused_parts(model)


def test_patch_of_a_peft_model_takes_fused():
    import peft

    base = tiny_causal_lm("llama")
    plain = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    ref = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    ref.load_state_dict(plain.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = peft_fast.patch(ref, fused="compile")
    assert peft_fast.fused_parts(fast)["loss"] == 1
    ids = torch.randint(0, 211, (2, 10))
    _assert_same_step(plain, fast, ids)


def test_generate_gives_the_unfused_tokens():
    plain, fast = _pair("qwen3")
    plain.eval(), fast.eval()
    ids = torch.randint(0, 211, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(input_ids=ids, **kw), plain.generate(input_ids=ids, **kw))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_compiled_training_step_is_one_graph_with_eager_loss_and_gradients(family):
    """The fused parts (the chunked loss's autograd function and the attention run with another rotary embedding
    included) trace into one graph: fullgraph=True fails on any graph break."""
    plain, fast = _pair(family)
    eager = copy.deepcopy(fast)
    ids = torch.randint(0, 211, (2, 16))
    torch._dynamo.reset()

    def step(model):
        return model(input_ids=ids, labels=ids).loss

    want_loss, want = _loss_and_grads(eager, ids)
    fast.train()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(fast)
    loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss, atol=1e-5, rtol=1e-5)
    _assert_grads({n: p.grad for n, p in fast.named_parameters() if p.grad is not None}, want, atol=1e-5, rtol=1e-4)


def test_an_adapted_head_keeps_the_unfused_loss_and_its_logits():
    plain, fast = _pair("llama", target_modules=["q_proj", "lm_head"])
    ids = torch.randint(0, 211, (2, 12))
    fast.train()
    assert fast(input_ids=ids, labels=ids).logits is not None  # the head is a LoRA layer: the loss cannot skip it
    got = _assert_same_step(plain, fast, ids)
    assert any("lm_head.lora" in n for n in got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's kernels need CUDA (bench/gpu_check.sh: fused)")
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_liger_backend_whole_model_matches_unfused(family):
    """Liger's kernels inside a whole model: its RMSNorm's backward meets the residual stream's shared gradient."""
    pytest.importorskip("liger_kernel")
    base = tiny_causal_lm(family).cuda()
    plain = peft_fast.get_peft_model(copy.deepcopy(base), peft_fast.LoraConfig(**LORA))
    fast = peft_fast.get_peft_model(base, peft_fast.LoraConfig(**LORA), fused="liger")
    fast.load_state_dict(plain.state_dict())
    assert sum(peft_fast.fused_parts(fast).values()) > 3
    _assert_same_step(plain, fast, torch.randint(0, 211, (2, 37), device="cuda"), loss_tol=1e-4, atol=1e-4,
                      rtol=1e-3)
