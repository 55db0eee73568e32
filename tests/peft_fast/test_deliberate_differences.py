"""Where peft_fast deliberately differs from PEFT 0.21: features not landed yet are refused up front, and PEFT bugs are not copied."""
import copy

import pytest
import torch
from tiny_models import AGAINST_PEFT

import peft_fast

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast-only behaviour")


def test_weight_decomposed_lora_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = copy.deepcopy(base)
    with pytest.raises(NotImplementedError, match="use_dora"):
        peft_fast.get_peft_model(base, peft_fast.LoraConfig(target_modules=["0", "2"], use_dora=True))
    assert [type(m) for m in base.modules()] == [type(m) for m in before.modules()]
    for (n, p), (_, q) in zip(base.named_parameters(), before.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad, n

    model = peft_fast.get_peft_model(base, peft_fast.LoraConfig(target_modules=["0"]))
    with pytest.raises(NotImplementedError, match="use_dora"):
        model.add_adapter("dora", peft_fast.LoraConfig(target_modules=["2"], use_dora=True))
    assert list(model.peft_config) == ["default"]
    assert isinstance(model.base_model.model[2], torch.nn.Linear)


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
