"""LoRA over bitsandbytes 8-bit layers (transformers' load_in_8bit, on CPU): training and merging as PEFT's
lora.bnb.Linear8bitLt. A merge dequantizes the int8 weight, adds the delta and re-quantizes it (the same int8 values
and scales as PEFT's); unmerging subtracts the same way; merge_and_unload(dequantize=True) keeps the exact merged
weight in a plain nn.Linear."""
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from qlora_models import save_tiny_llama  # noqa: E402
from tiny_models import assert_close, impl, ref  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_8bit"))


def _pair(model_dir, dtype=torch.float32):
    models = []
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(
                load_in_8bit=True), device_map="cpu", dtype=dtype)
            torch.manual_seed(0)
            models.append(lib.get_peft_model(base, lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                   init_lora_weights=False)))
    assert type(models[1].base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear8bitLt"
    models[1].load_state_dict(models[0].state_dict())
    return models


IDS = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=IDS).logits


def _on_both(models, method: str, **kwargs) -> list:
    """Each model's `method` (PEFT's 8-bit merges warn about rounding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [getattr(model, method)(**kwargs) for model in models]


def _int8(model):
    return {n: (m.weight.data.clone(), (m.state.SCB if m.state.SCB is not None else m.weight.SCB).clone())
            for n, m in model.named_modules()
            if type(m).__module__.startswith("bitsandbytes") and any(t in n for t in TARGETS)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_step_matches_peft(model_dir, dtype):
    """bf16: PEFT's bitsandbytes order (each delta cast to the output's dtype, then added), not its dense one."""
    r, i = _pair(model_dir, dtype)
    losses = []
    for model in (r, i):
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[1], losses[0])
    gr = {n: p.grad for n, p in r.named_parameters() if p.grad is not None}
    gi = {n: p.grad for n, p in i.named_parameters() if p.grad is not None}
    assert gr.keys() == gi.keys() and gr
    for n in gr:
        assert_close(gi[n], gr[n], msg=n)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unmerge_requantize_as_peft(model_dir, safe_merge):
    r, i = _pair(model_dir)
    r.eval()
    i.eval()
    before = _int8(i)
    _on_both((r, i), "merge_adapter", safe_merge=safe_merge)
    got, want = _int8(i), _int8(r)
    assert got.keys() == want.keys() and len(got) == 3 * 2  # three targets in each of two layers
    for n in want:
        assert torch.equal(got[n][0], want[n][0]) and torch.equal(got[n][1], want[n][1]), n
        assert not torch.equal(got[n][0], before[n][0]), n
    assert_close(_logits(i), _logits(r))
    _on_both((r, i), "unmerge_adapter")
    got, want = _int8(i), _int8(r)
    for n in want:
        assert torch.equal(got[n][0], want[n][0]) and torch.equal(got[n][1], want[n][1]), n


def test_merge_and_unload_as_peft_and_dequantized(model_dir):
    r, i = _pair(model_dir)
    r.eval()
    i.eval()
    unmerged = _logits(i)
    r_merged, i_merged = _on_both((r, i), "merge_and_unload")
    assert type(i_merged.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    assert_close(_logits(i_merged), _logits(r_merged))
    _, i2 = _pair(model_dir)
    i2.eval()
    dense, = _on_both((i2,), "merge_and_unload", dequantize=True)
    assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert_close(_logits(dense), unmerged, atol=0.05, rtol=0.05)  # the 8-bit matmul's rounding, now gone


def test_dequantized_merge_of_a_bf16_model_is_a_bf16_model_that_saves_and_reloads(model_dir, tmp_path):
    """Every 8-bit layer left (the untargeted ones too) becomes an nn.Linear in the model's dtype, which an int8
    layer does not record; with none left, the quantization markers go, so the saved model reloads as it is."""
    _, i = _pair(model_dir, torch.bfloat16)
    i.eval()
    dense, = _on_both((i,), "merge_and_unload", dequantize=True)
    linears = [m for n, m in dense.named_modules() if n.endswith("_proj")]
    assert linears and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    assert not getattr(dense, "is_loaded_in_8bit", False)
    want = _logits(dense)
    dense.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert_close(_logits(again), want)
