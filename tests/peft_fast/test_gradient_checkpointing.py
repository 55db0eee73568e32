"""get_peft_model on a gradient-checkpointed (non-quantized) model makes its inputs require grad, as PEFT does:
otherwise reentrant checkpointing over a frozen base gives the adapters no gradient at all."""
import warnings

import torch
from tiny_models import impl, ref
from transformers import LlamaConfig, LlamaForCausalLM


def _model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    m.main_input_name = "inputs_embeds"  # so transformers does not add the input hook itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return m


def _lora_grads(lib, **kw):
    model = lib.get_peft_model(_model(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False, **kw))
    model.train()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def test_adapters_get_gradients_through_reentrant_checkpointing():
    got, want = _lora_grads(impl), _lora_grads(ref)
    assert got.keys() == want.keys() and len(got) == 8
    assert all(g is not None and g.abs().sum() > 0 for g in got.values())
    assert all((want[n] is None) == (got[n] is None) for n in got)


def test_dora_through_reentrant_checkpointing_matches_peft():
    """The recomputed forward sees the same DoRA scale: gradients of A, B and the magnitude equal PEFT's."""
    got, want = _lora_grads(impl, use_dora=True), _lora_grads(ref, use_dora=True)
    assert got.keys() == want.keys() and len(got) == 12
    for n in got:
        assert got[n] is not None and got[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_kbit_preparation_treats_a_peft_fast_quantized_model_as_4_bit():
    """A model quantized by peft_fast.quantize (NF4Linear layers, no is_loaded_in_4bit flag) is a k-bit model for
    prepare_model_for_kbit_training: it gets gradient checkpointing and input embeddings whose output requires grad,
    as a bitsandbytes model does. (PEFT's own function does not know NF4Linear: peft_fast's alone.)"""
    import peft_fast

    torch.manual_seed(0)
    model = peft_fast.quantize(LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64)))
    model.main_input_name = "inputs_embeds"  # so that transformers does not add the input hook itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_fast.prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train()(input_ids=torch.randint(0, 64, (2, 5)))
    assert seen == [True]
