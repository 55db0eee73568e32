"""peft_fast.quantize: NF4Linear layers made without bitsandbytes equal transformers + bitsandbytes' 4-bit model
(bytes, checkpoint keys, logits), and QLoRA on them equals HF PEFT over the bitsandbytes model."""
import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("bitsandbytes")

import peft  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import peft_fast  # noqa: E402
from peft_fast import NF4Linear, quantize  # noqa: E402
from qlora_models import CASES, IDS, ids, load4, lora_kw, save_tiny_llama  # noqa: E402
from switches import use_settings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_q"))


def quantized(path, case):
    dtype, compute, double, qt = case
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    return quantize(model, quant_type=qt, double_quant=double, compute_dtype=compute)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_bytes_keys_and_logits_as_bitsandbytes(model_dir, case):
    bnb_model, ours = load4(model_dir, case), quantized(model_dir, case)
    assert isinstance(ours.model.layers[0].mlp.up_proj, NF4Linear)
    assert type(ours.lm_head) is nn.Linear  # the output embedding stays dense, as transformers does
    want, got = bnb_model.state_dict(), ours.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    # With gradients on: under no_grad bitsandbytes repacks CPU weights for its own bf16 kernel.
    torch.testing.assert_close(ours(ids()).logits, bnb_model(ids()).logits, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "triton"])  # triton on a CPU: the interpreter
@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_qlora_matches_peft_over_bitsandbytes(model_dir, case, backend, monkeypatch):
    use_settings(monkeypatch, backend=backend)
    kw = lora_kw()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = peft.get_peft_model(load4(model_dir, case), peft.LoraConfig(**kw))
        model = peft_fast.get_peft_model(quantized(model_dir, case), peft_fast.LoraConfig(**kw))
    r_p, i_p = dict(ref_model.named_parameters()), dict(model.named_parameters())
    with torch.no_grad():
        for n, p in i_p.items():
            if "lora_" in n:
                p.copy_(r_p[n])
    ref_model.train(), model.train()
    out_r, out_i = ref_model(ids(), labels=ids()), model(ids(), labels=ids())
    fp32 = 1e-6 if backend == "auto" else 1e-5  # the Triton GEMMs sum in another order
    bf16 = 8e-3 if backend == "auto" else 2e-2  # a few bf16 ulps of the logits' scale once the order differs
    tol = dict(atol=fp32, rtol=fp32) if case[0] == torch.float32 else dict(atol=bf16 if backend != "auto" else 1e-5,
                                                                           rtol=bf16)
    torch.testing.assert_close(out_i.logits, out_r.logits, **tol)
    out_r.loss.backward(), out_i.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and set(grads) == {n for n, p in ref_model.named_parameters() if p.requires_grad}
    for n, g in grads.items():
        torch.testing.assert_close(g, r_p[n].grad, **({"atol": 1e-5, "rtol": 1e-4} if case[0] == torch.float32
                                                      else {"atol": 2e-3, "rtol": 5e-2}), msg=n)


def test_bitsandbytes_checkpoint_loads_into_quantized_model(model_dir, tmp_path):
    case = CASES[0]
    load4(model_dir, case).save_pretrained(tmp_path)  # transformers' 4-bit checkpoint
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    torch.manual_seed(3)
    cfg = LlamaForCausalLM.from_pretrained(model_dir).config
    fresh = quantize(LlamaForCausalLM(cfg), double_quant=True)  # different random weights
    assert not torch.equal(fresh.model.layers[0].self_attn.q_proj.weight, sd["model.layers.0.self_attn.q_proj.weight"])
    fresh.load_state_dict(sd, strict=False)
    want = quantized(model_dir, case)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids()).logits, want(ids()).logits, atol=0, rtol=0)
    for k, v in want.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_checkpoint_errors_name_the_layer(model_dir):
    model = quantized(model_dir, CASES[0])
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    key = "model.layers.1.self_attn.q_proj.weight"
    dense = dict(sd)
    dense[key] = torch.randn(64, 64)
    for k in [k for k in dense if k.startswith(key + ".")]:
        del dense[k]
    with pytest.raises(RuntimeError, match="layers.1.self_attn.q_proj.weight: a 4-bit NF4Linear needs the quant"):
        model.load_state_dict(dense)
    corrupt = dict(sd)
    corrupt[key + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="layers.1.self_attn.q_proj.weight: the 4-bit quant state is corrupt"):
        model.load_state_dict(corrupt)
    wrong = dict(sd)
    wrong[key] = sd[key][:10]
    with pytest.raises(RuntimeError, match="does not fit this layer"):
        model.load_state_dict(wrong)
    for k, v in model.state_dict().items():
        if k.startswith("model.layers.1.self_attn.q_proj"):
            assert torch.equal(v, before[k]), k  # this layer is untouched by the failed loads


def test_bad_arguments_leave_the_model_unchanged():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        quantize(model, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize(model, blocksize=48)
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    quantize(model, skip_modules=["2"])
    assert isinstance(model[0], NF4Linear) and type(model[2]) is nn.Linear
    odd = quantize(nn.Sequential(nn.Linear(40, 8)))  # 64-blocks span rows, as bitsandbytes allows
    x = torch.randn(3, 40)
    torch.testing.assert_close(odd(x), x @ odd[0].dequantize().T + odd[0].bias)
    nan = nn.Sequential(nn.Linear(64, 8))
    nan[0].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="0.weight must be finite"):
        quantize(nan)


def _patched(model):
    torch.manual_seed(0)
    pm = peft_fast.get_peft_model(model, peft_fast.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    return pm.eval()


def test_kbit_and_requantizing_merge_on_quantized_model(model_dir):
    model = quantized(model_dir, CASES[1])
    assert peft_fast.prepare_model_for_kbit_training(model) is model  # recognised as quantized: frozen
    assert all(not p.requires_grad for p in model.parameters())
    pm = _patched(model)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    exact = layer.base_layer.dequantize() + layer.get_delta_weight("default")
    with pytest.warns(peft_fast.QuantizedMergeWarning, match="max abs difference"):
        pm.merge_adapter()
    assert torch.allclose(layer.base_layer.dequantize(), exact, atol=0.05)  # re-quantized: 4-bit rounding
    assert not torch.equal(layer.base_layer.dequantize(), exact)
    assert isinstance(layer.base_layer, NF4Linear)


def test_dequantizing_merge_is_exact(model_dir):
    pm = _patched(quantized(model_dir, CASES[1]))
    with torch.no_grad():
        want = pm(ids()).logits
    dense = pm.merge_and_unload(dequantize=True)
    assert type(dense.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(isinstance(m, NF4Linear) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(ids()).logits, want, atol=1e-4, rtol=1e-4)


def test_mismatched_quant_state_is_refused_naming_the_layer(model_dir):
    import bitsandbytes.functional as BF

    bnb_model = load4(model_dir, CASES[1])
    layer = bnb_model.model.layers[1].self_attn.v_proj
    other = torch.randn(16, 64)  # a quant state made for another shape (v_proj is 32 x 64)
    _, qs = BF.quantize_4bit(other, blocksize=64, quant_type="fp4")
    layer.weight.quant_state = qs
    before = {k: v.clone() for k, v in bnb_model.state_dict().items() if "quant_state" not in k}
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.v_proj \(Linear4bit\): mismatched 4-bit "
                                         r"quant_state: its quant_state describes a weight of shape \(16, 64\), the layer is \(32, 64\)"):
        peft_fast.get_peft_model(bnb_model, peft_fast.LoraConfig(r=4, target_modules=["v_proj"]))
    assert type(bnb_model.model.layers[0].self_attn.v_proj).__name__ == "Linear4bit"  # nothing was patched
    after = bnb_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())

    ours = quantized(model_dir, CASES[0])
    layer = ours.model.layers[0].mlp.down_proj
    layer.quant_state = layer.quant_state.__class__(layer.quant_state.absmax[:-1], layer.quant_state.shape,
                                                    layer.quant_state.dtype, 64, "nf4",
                                                    offset=layer.quant_state.offset,
                                                    nested_absmax=layer.quant_state.nested_absmax,
                                                    nested_code=layer.quant_state.nested_code)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj \(NF4Linear\): mismatched 4-bit quant_state: "
                                         r"absmax has \d+ entries"):
        peft_fast.get_peft_model(ours, peft_fast.LoraConfig(r=4, target_modules=["down_proj"]))


@pytest.mark.parametrize("base", ["bnb", "quantize"])
def test_float32_activations_into_bf16_compute_run_fused(model_dir, base, monkeypatch):
    """QLoRA's usual recipe: float32 activations (upcast norms), bf16 compute. The Triton path runs the whole op in
    bf16 (one fused op) where PEFT adds a float32 delta to bitsandbytes' output: equal within bf16 tolerance."""
    import peft_fast.tuners.lora.variants as variants

    case = CASES[3]  # float32 model, bf16 compute
    kw = lora_kw()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = peft.get_peft_model(load4(model_dir, case), peft.LoraConfig(**kw))
        ours_base = load4(model_dir, case) if base == "bnb" else quantized(model_dir, case)
        model = peft_fast.get_peft_model(ours_base, peft_fast.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in dict(model.named_parameters()).items():
            if "lora_" in n:
                p.copy_(dict(ref_model.named_parameters())[n])
    ref_model.train(), model.train()  # in eval, bitsandbytes repacks CPU weights for its own bf16 kernel
    calls, real = [], variants.qlora_linear_triton
    monkeypatch.setattr(variants, "qlora_linear_triton", lambda x, *a: calls.append(x.dtype) or real(x, *a))
    use_settings(monkeypatch, backend="triton")
    out_r, out_i = ref_model(ids(), labels=ids()), model(ids(), labels=ids())
    assert calls and set(calls) == {torch.bfloat16} and out_i.logits.dtype == torch.float32
    scale = out_r.logits.abs().max().item()
    torch.testing.assert_close(out_i.logits, out_r.logits, atol=2e-2 * scale, rtol=0)
    out_r.loss.backward(), out_i.loss.backward()
    r_p = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            g, want = p.grad, r_p[n].grad
            torch.testing.assert_close(g, want, atol=3e-2 * want.abs().max().item(), rtol=0, msg=n)


@pytest.mark.parametrize("case", CASES[:1], ids=IDS[:1])
def test_a_classifier_head_stays_dense_as_under_bitsandbytes(model_dir, case):
    """transformers keeps the module of the model's last parameter in 16 bits (a classifier's `score`), besides
    the output embedding: the same layers stay dense here, and the same keys come out."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    dtype, compute, double, qt = case
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_compute_dtype=compute,
                           bnb_4bit_use_double_quant=double)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_model = AutoModelForSequenceClassification.from_pretrained(model_dir, quantization_config=q,
                                                                       device_map="cpu", dtype=dtype, num_labels=3)
        ours = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype, num_labels=3)
    ours.score.weight.data.copy_(bnb_model.score.weight.data)
    quantize(ours, quant_type=qt, double_quant=double, compute_dtype=compute)
    assert type(ours.score) is type(bnb_model.score) is nn.Linear
    assert set(ours.state_dict()) == set(bnb_model.state_dict())
    model = peft_fast.get_peft_model(ours, peft_fast.LoraConfig(r=2, task_type="SEQ_CLS"))  # the head trains
    assert model.base_model.model.score.modules_to_save["default"].weight.requires_grad


def test_load_quantized_rebuilds_the_checkpoints_own_choice_of_4bit_layers(model_dir, tmp_path):
    """Which layers a checkpoint holds in 4 bits is read from its keys, whatever the defaults now say: a classifier
    checkpoint written before `score` stayed dense by default (a 4-bit `score`) still loads, and equals the model."""
    from transformers import AutoModelForSequenceClassification

    from peft_fast.bases.quantize import quantize_except

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    quantize_except(model, set(), quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=None,
                    experts=True, progressbar=False, quant_storage=torch.uint8)
    assert isinstance(model.score, NF4Linear)
    peft_fast.save_quantized(model, str(tmp_path))
    back = peft_fast.load_quantized(str(tmp_path))
    assert isinstance(back.score, NF4Linear)
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, model(ids()).logits, atol=0, rtol=0)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_on_4bit_layers_are_refused_naming_the_fix(model_dir, storage, init):
    """They rewrite the base weight into a residual: quantize after initialising. With float-stored codes the
    weight's dtype alone would let the SVD / QR run on packed bytes."""
    model = quantize(LlamaForCausalLM.from_pretrained(model_dir), quant_storage=storage)
    with pytest.raises(TypeError, match="4-bit codes.*initialise before quantising"):
        peft_fast.get_peft_model(model, peft_fast.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
