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
