"""Where peft_fast deliberately differs from PEFT 0.21: PEFT limits it lifts, and PEFT bugs it does not copy."""
import pytest
import torch
from tiny_models import AGAINST_PEFT, assert_close, inputs, make_pair, out

import peft_fast

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast-only behaviour")


def test_adapter_names_with_dora_are_served():
    """PEFT 0.21 raises "Cannot pass `adapter_names` when DoRA is enabled"; peft_fast serves such batches, each
    sample as its adapter alone would (tests/peft_fast/test_dora.py checks this in depth)."""
    _, r, i = make_pair("mlp", use_dora=True)
    r.eval()
    i.eval()
    x = inputs("mlp", batch=2)
    with torch.no_grad():
        mixed = out(i, x, adapter_names=["default", "__base__"])
        assert_close(mixed[:1], out(r, {"X": x["X"][:1]}))
        with r.disable_adapter():
            assert_close(mixed[1:], out(r, x)[1:], atol=0, rtol=0)  # the same batch: the same base matmuls
    with pytest.raises(ValueError, match="DoRA"):  # last: PEFT leaves its adapter_names hooks behind when it raises
        out(r, x, adapter_names=["default", "__base__"])


def test_adapter_added_in_eval_mode_does_not_drop_out():
    """A deliberate difference from PEFT 0.21, whose new nn.Dropout stays in training mode after add_adapter."""
    torch.manual_seed(0)
    model = peft_fast.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                                     peft_fast.LoraConfig(target_modules=["0"]))
    model.eval()
    model.add_adapter("b", peft_fast.LoraConfig(target_modules=["0"], lora_dropout=0.5, init_lora_weights=False))
    model.set_adapter("b")
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


class _OffsetConv(torch.nn.Conv2d):
    """A Conv2d subclass whose forward adds a constant: PEFT builds the LoRA factors with the base's class."""

    def forward(self, x):
        return super().forward(x) + 1.0


def test_lora_factors_of_a_conv_subclass_are_plain_convs():
    """PEFT makes lora_A / lora_B of the base's own class, so a subclass's forward also runs on the factors, and
    PEFT's merged model then disagrees with its forward; peft_fast's factors are plain convolutions, so its forward
    is what its merge gives."""
    import peft

    x = torch.randn(2, 3, 6, 6)
    outs = {}
    for lib in (peft, peft_fast):
        torch.manual_seed(0)
        model = lib.get_peft_model(torch.nn.Sequential(_OffsetConv(3, 4, 3)),
                                   lib.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        with torch.no_grad():
            outs[lib] = (model(x), model.merge_and_unload()(x))
    assert not torch.allclose(outs[peft][0], outs[peft][1], atol=1e-4)  # PEFT: forward != merge
    assert_close(outs[peft_fast][0], outs[peft_fast][1], atol=1e-5, rtol=1e-5)
    assert_close(outs[peft_fast][1], outs[peft][1], atol=1e-5, rtol=1e-5)  # the merged models agree
