"""prepare_model_for_kbit_training: PEFT's and the implementation's, applied to identical copies of a tiny Llama
(loaded in 4-bit by bitsandbytes on CPU, or not quantized), leave the same model behind, and a LoRA training step
on top (with gradient checkpointing where the function enables it) gives the same loss and LoRA gradients.

What is compared: each parameter's class, dtype and requires_grad; `is_gradient_checkpointing`; the checkpoint
function's keyword arguments; the forward hooks on the input embeddings and whether their output requires grad in a
real forward. Expected values are also asserted outright, so that both libraries cannot agree on a no-op.
"""
import functools
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from tiny_models import assert_close, impl, name_diff, ref  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
# id -> (loaded in 4-bit, model dtype == bnb compute dtype). In "4bit-bf16-storage" the packed 4-bit weights are
# stored as bfloat16 (bnb_4bit_quant_storage), so only their class tells them from weights to upcast.
CASES = {
    "4bit-bf16": (True, torch.bfloat16),
    "4bit-bf16-storage": (True, torch.bfloat16),
    "4bit-fp32": (True, torch.float32),
    "plain-bf16": (False, torch.bfloat16),
    "plain-fp32": (False, torch.float32),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama_kbit")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(path, case):
    quantized, dtype = CASES[case]
    kw = {"dtype": dtype, "device_map": "cpu"}
    if quantized:
        storage = dtype if "storage" in case else torch.uint8
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_quant_storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    assert bool(getattr(model, "is_loaded_in_4bit", False)) == quantized
    return model


def prepared_pair(path, case, mutate=None, **kw):
    """(PEFT-prepared, impl-prepared) fresh copies; `mutate(model)` runs on each before preparing."""
    models = []
    for lib in (ref, impl):
        model = load(path, case)
        if mutate is not None:
            mutate(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecates gradient_checkpointing_*
            out = lib.prepare_model_for_kbit_training(model, **kw)
        assert out is model
        models.append(model)
    return models


def ids(seed=1, batch=3, seq=6):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def gc_on(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.is_gradient_checkpointing


def checkpoint_kwargs(model):
    """The keyword arguments bound into each decoder layer's checkpoint function (None where it has none)."""
    out = []
    for layer in model.model.layers:
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        out.append(dict(fn.keywords) if isinstance(fn, functools.partial) else None)
    return out


def embedding_output_requires_grad(model):
    """Run a training-mode forward and report whether the input embeddings' output required grad (as seen after
    the hooks the preparation registered, which run before this probe's)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids(seed=5))
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def snapshot(model):
    return {
        "params": {n: (type(p).__name__, p.dtype, p.requires_grad) for n, p in model.named_parameters()},
        "gc": gc_on(model),
        "ckpt_kwargs": checkpoint_kwargs(model),
        "embedding_hooks": len(model.get_input_embeddings()._forward_hooks),
        "embedding_out_requires_grad": embedding_output_requires_grad(model),
    }


def assert_same_state(ref_model, impl_model):
    r, i = snapshot(ref_model), snapshot(impl_model)
    assert set(r["params"]) == set(i["params"]), name_diff(r["params"], i["params"])
    for n in r["params"]:
        assert i["params"][n] == r["params"][n], (n, i["params"][n], r["params"][n])
    for key in ("gc", "ckpt_kwargs", "embedding_hooks", "embedding_out_requires_grad"):
        assert i[key] == r[key], (key, i[key], r[key])
    return r


def lora_pair(ref_model, impl_model):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": list(TARGETS), "init_lora_weights": False, "lora_dropout": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref_peft = ref.get_peft_model(ref_model, ref.LoraConfig(**kw))
        torch.manual_seed(0)
        impl_peft = impl.get_peft_model(impl_model, impl.LoraConfig(**kw))
    r_p, i_p = dict(ref_peft.named_parameters()), dict(impl_peft.named_parameters())
    assert set(r_p) == set(i_p), name_diff(r_p, i_p)
    with torch.no_grad():
        for n, p in i_p.items():
            assert (p.dtype, p.requires_grad) == (r_p[n].dtype, r_p[n].requires_grad), n
            if "lora_" in n:
                p.copy_(r_p[n])
    return ref_peft, impl_peft


def assert_same_training_step(ref_model, impl_model, tol):
    ref_peft, impl_peft = lora_pair(ref_model, impl_model)
    x = ids()
    losses = []
    for m in (ref_peft, impl_peft):
        m.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], **tol)
    rg = {n: p.grad for n, p in ref_peft.named_parameters() if p.requires_grad}
    ig = {n: p.grad for n, p in impl_peft.named_parameters() if p.requires_grad}
    assert set(rg) == set(ig) and len(rg) == 2 * len(TARGETS) * 2 and all("lora_" in n for n in rg)
    for n in rg:
        # the gradient reaches every LoRA weight, through the checkpointed layers where checkpointing is on
        assert rg[n] is not None and ig[n] is not None, n
        assert rg[n].abs().sum() > 0, n
        assert_close(ig[n], rg[n], msg=n, **tol)


def tol(case):
    return {"atol": 1e-6, "rtol": 1e-6} if CASES[case][1] == torch.float32 else {"atol": 1e-5, "rtol": 8e-3}


@pytest.mark.parametrize("case", list(CASES))
def test_default_preparation_and_training_step(model_dir, case):
    ref_model, impl_model = prepared_pair(model_dir, case)
    state = assert_same_state(ref_model, impl_model)
    quantized = CASES[case][0]
    for n, (cls, dtype, requires_grad) in state["params"].items():
        assert not requires_grad, n
        if cls == "Params4bit":
            # the packed 4-bit weight is never upcast
            assert dtype == (torch.bfloat16 if "storage" in case else torch.uint8), n
        else:
            assert dtype == torch.float32, n  # half-precision weights are upcast, also in a model not quantized
    assert quantized == any(cls == "Params4bit" for cls, _, _ in state["params"].values())
    # only a quantized model gets checkpointing, with the input hook that reentrant checkpointing needs
    assert state["gc"] == quantized
    assert state["embedding_out_requires_grad"] == quantized
    assert state["ckpt_kwargs"] == ([{}] * 2 if quantized else [None] * 2)
    assert_same_training_step(ref_model, impl_model, tol(case))


def _not_input_ids(model):
    # transformers 5's gradient_checkpointing_enable itself calls enable_input_require_grads when the model's main
    # input is input_ids; with another main input, only what the preparation registers is left to see.
    model.main_input_name = "inputs_embeds"


@pytest.mark.parametrize("isolated", [False, True], ids=["as-loaded", "isolated"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_use_reentrant(model_dir, use_reentrant, isolated):
    ref_model, impl_model = prepared_pair(model_dir, "4bit-bf16", mutate=_not_input_ids if isolated else None,
                                          gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    state = assert_same_state(ref_model, impl_model)
    assert state["gc"]
    assert state["ckpt_kwargs"] == [{"use_reentrant": use_reentrant}] * 2
    if isolated:  # with use_reentrant=False the input hook is not needed, and the preparation does not register it
        assert state["embedding_out_requires_grad"] == use_reentrant
        assert state["embedding_hooks"] == int(use_reentrant)
    else:
        assert state["embedding_out_requires_grad"]
    assert_same_training_step(ref_model, impl_model, tol("4bit-bf16"))


def test_without_gradient_checkpointing(model_dir):
    ref_model, impl_model = prepared_pair(model_dir, "4bit-bf16", use_gradient_checkpointing=False,
                                          auto_clear_cache=False)
    state = assert_same_state(ref_model, impl_model)
    assert not state["gc"] and not state["embedding_out_requires_grad"] and state["embedding_hooks"] == 0
    assert all(dtype == torch.float32 for cls, dtype, _ in state["params"].values() if cls != "Params4bit")
    assert_same_training_step(ref_model, impl_model, tol("4bit-bf16"))


def _raise_attribute_error(self):
    raise AttributeError("hidden for this test")


def _hide_enable_input_require_grads(model):
    _not_input_ids(model)  # else transformers' own gradient_checkpointing_enable calls the hidden method
    model.__class__ = type("NoInputRequireGrads", (type(model),),
                           {"enable_input_require_grads": property(_raise_attribute_error)})
    assert not hasattr(model, "enable_input_require_grads")


def test_forward_hook_fallback(model_dir):
    """A model without enable_input_require_grads gets a forward hook on its input embeddings instead."""
    ref_model, impl_model = prepared_pair(model_dir, "4bit-fp32", mutate=_hide_enable_input_require_grads)
    state = assert_same_state(ref_model, impl_model)
    assert state["gc"] and state["embedding_out_requires_grad"] and state["embedding_hooks"] == 1
    assert_same_training_step(ref_model, impl_model, tol("4bit-fp32"))


class _Absent:
    """An attribute the class does not have (hasattr is False), hiding the one its base has."""

    def __get__(self, obj, owner=None):
        raise AttributeError("not in this transformers version")


def _old_gradient_checkpointing_enable(model):
    def gradient_checkpointing_enable(self):  # no gradient_checkpointing_kwargs, as in old transformers
        return type(self).__mro__[1].gradient_checkpointing_enable(self)

    model.__class__ = type("OldCheckpointingAPI", (type(model),),
                           {"gradient_checkpointing_enable": gradient_checkpointing_enable,
                            "activation_checkpointing_enable": _Absent()})


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_enable_without_kwargs_parameter(model_dir):
    """kwargs are dropped with a FutureWarning when gradient_checkpointing_enable does not take them."""
    models = []
    for lib in (ref, impl):
        model = load(model_dir, "4bit-fp32")
        _old_gradient_checkpointing_enable(model)
        with pytest.warns(FutureWarning, match="gradient_checkpointing_kwargs is not supported"):
            lib.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
        models.append(model)
    state = assert_same_state(*models)
    assert state["gc"] and state["embedding_out_requires_grad"]
    # without kwargs, none are warned about
    model = load(model_dir, "4bit-fp32")
    _old_gradient_checkpointing_enable(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        impl.prepare_model_for_kbit_training(model)
    assert not [w for w in caught if "gradient_checkpointing_kwargs is not supported" in str(w.message)]


def _mark_hqq(model):
    model.hqq_quantized = True


def test_no_upcast_quantization_method(model_dir):
    """HQQ / GPTQ / AQLM / EETQ / torchao models are not upcast, but get checkpointing like a bnb k-bit model."""
    ref_model, impl_model = prepared_pair(model_dir, "plain-bf16", mutate=_mark_hqq)
    state = assert_same_state(ref_model, impl_model)
    assert all(dtype == torch.bfloat16 and not rg for _, dtype, rg in state["params"].values())
    assert state["gc"] and state["embedding_out_requires_grad"]


def test_exported():
    import peft_fast

    assert "prepare_model_for_kbit_training" in peft_fast.__all__
    assert peft_fast.prepare_model_for_kbit_training is impl.prepare_model_for_kbit_training or impl is not peft_fast
