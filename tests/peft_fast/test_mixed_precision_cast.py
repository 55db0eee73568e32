"""cast_mixed_precision_params against PEFT's: frozen parameters in the 16-bit dtype, trainable ones in float32, the
same outputs under autocast afterwards; packed 4-bit codes keep their bytes (PEFT's would convert them)."""
import warnings

import pytest
import torch

from tiny_models import base_model, default_cfg, impl, inputs, make_pair, out, peft_fast_only, ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", [{}, {"use_dora": True, "modules_to_save": ["lm_head"]}], ids=["lora", "dora-save"])
def test_casts_as_peft(dtype, cfg):
    _, r, i = make_pair("llama", **cfg)
    x = inputs("llama")
    for m in (r, i):
        m.eval()
        with torch.no_grad():
            out(m, x)  # plans and caches made in float32 first
    ref.cast_mixed_precision_params(r, dtype)
    impl.cast_mixed_precision_params(i, dtype)
    want = {n: p.dtype for n, p in r.named_parameters()}
    assert {n: p.dtype for n, p in i.named_parameters()} == want
    assert dtype in want.values() and torch.float32 in want.values()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        torch.testing.assert_close(out(i, x).float(), out(r, x).float(), atol=2e-2, rtol=2e-2)


@peft_fast_only
def test_packed_4bit_codes_keep_their_bytes():
    for storage in (torch.uint8, torch.bfloat16):
        model = impl.quantize(base_model("llama"), quant_storage=storage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = impl.get_peft_model(model, impl.LoraConfig(**default_cfg("llama")))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        before = layer.codes().clone()
        x = inputs("llama")
        with torch.no_grad():
            want = out(model.eval(), x)
        impl.cast_mixed_precision_params(model, torch.float16)
        assert layer.weight.dtype == storage and torch.equal(layer.codes(), before)
        assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            torch.testing.assert_close(out(model, x).float(), want, atol=5e-2, rtol=5e-2)


@peft_fast_only
def test_a_non_float_dtype_is_refused_unchanged():
    """PEFT casts every parameter to whatever dtype it is given (int8 would truncate the weights)."""
    _, _, i = make_pair("mlp")
    before = {n: p.detach().clone() for n, p in i.named_parameters()}
    with pytest.raises(ValueError, match="floating-point"):
        impl.cast_mixed_precision_params(i, torch.int8)
    assert all(torch.equal(p, before[n]) for n, p in i.named_parameters())
