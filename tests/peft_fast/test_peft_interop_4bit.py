"""peft_fast.patch on a PEFT QLoRA model (transformers + bitsandbytes 4-bit on CPU): PEFT's lora.bnb.Linear4bit
layers run peft_fast's fused 4-bit op with PEFT's logits and gradients, plain LoRA and DoRA."""
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

import peft_fast  # noqa: E402
from qlora_models import CASES, IDS, load4, lora_kw, save_tiny_llama  # noqa: E402
from tiny_models import AGAINST_PEFT, assert_close, count_calls, ref  # noqa: E402

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's patching of PEFT models has no PEFT counterpart")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _pair(model_dir, case, **over):
    """Two PEFT QLoRA models over fresh 4-bit loads with the same adapter weights (bitsandbytes repacks a CPU weight
    on the first forward, so the models share nothing)."""
    models = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            models.append(ref.get_peft_model(load4(model_dir, case), ref.LoraConfig(**lora_kw(**over))))
    return models


def _run(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_patched_qlora_model_gives_peft_logits_and_gradients(model_dir, case, dora, monkeypatch):
    import peft_fast.tuners.lora.variants as variants

    fused = count_calls(monkeypatch, variants, "qlora_linear_reference", "qlora_linear_triton")
    plain, fast = _pair(model_dir, case, use_dora=dora)
    peft_fast.patch(fast)
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "FastLinear4bit" and isinstance(layer, type(plain.base_model.model.model.layers[0]
                                                                                 .self_attn.q_proj))
    assert len(peft_fast.patched_layers(fast)) == 8
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    (y_f, g_f), (y_p, g_p) = _run(fast.train(), ids), _run(plain.train(), ids)
    tol = {"atol": 1e-5, "rtol": 1e-5} if case[0] == torch.float32 else {"atol": 1e-4, "rtol": 1e-2}
    assert_close(y_f, y_p, **tol)
    for n in g_p:
        assert_close(g_f[n], g_p[n], msg=n, **tol)
    if not dora and case[0] == case[1]:  # a compute dtype unlike the input's runs the base on its own, as PEFT does
        assert fused, "the patched 4-bit layers never ran peft_fast's fused op"
