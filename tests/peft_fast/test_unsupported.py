"""Features that have not landed yet are refused up front, with a clear message, and nothing is changed."""
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
