"""NF4Linear's quant_storage (bitsandbytes' bnb_4bit_quant_storage): the packed codes held as the bytes of a float
tensor, as FSDP setups store them so that the codes shard like the other weights. The same bytes, keys and outputs
as bitsandbytes with that storage and as uint8 codes; QLoRA and DoRA train bit for bit as over uint8 codes; casts of
the module and kbit preparation never convert the codes, and a cast that did is named. FSDP2 over them:
test_distributed.py (fsdp-nf4-*store); compiled: test_compiled_training.py (dora-nf4-bf16store)."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
from qlora_models import CASES, ids, save_tiny_llama
from switches import use_settings
from tiny_models import peft_fast_only
from transformers import LlamaForCausalLM

import peft_fast
from peft_fast import NF4Linear, quantize
from peft_fast.bases.checkpoint import save_quantized

pytestmark = peft_fast_only
STORAGES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_storage"))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)  # float codes may spell NaNs: compare bytes


def _quantized(model_dir, storage, dtype=torch.float32):
    return quantize(LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype), quant_storage=storage)


@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_same_bytes_keys_and_logits_as_bitsandbytes_with_that_storage(model_dir, storage):
    pytest.importorskip("bitsandbytes")
    from qlora_models import load4

    want, ours = load4(model_dir, CASES[0], storage).state_dict(), _quantized(model_dir, storage)
    got = ours.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and want[k].shape == got[k].shape, k
        assert torch.equal(_bytes(want[k]), _bytes(got[k])), k
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == storage and layer.weight.shape == (64 * 64 // 2 // storage.itemsize, 1)
    assert torch.equal(ours(ids()).logits, _quantized(model_dir, torch.uint8)(ids()).logits)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton on a CPU: the interpreter
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_over_float_stored_codes_equals_uint8_codes(model_dir, dora, backend, monkeypatch):
    use_settings(monkeypatch, backend=backend)
    runs = []
    for storage in (torch.uint8, torch.bfloat16):
        torch.manual_seed(0)
        model = peft_fast.get_peft_model(_quantized(model_dir, storage), peft_fast.LoraConfig(
            r=4, target_modules="all-linear", init_lora_weights=False, use_dora=dora, lora_dropout=0.1))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(1)
        losses = []
        for _ in range(2):
            loss = model(input_ids=ids(), labels=ids()).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad(), warnings.catch_warnings():
            logits = model.eval()(input_ids=ids(2)).logits
            warnings.simplefilter("ignore", peft_fast.QuantizedMergeWarning)
            merged = model.merge_and_unload()  # re-quantized into the layer's own storage
            assert merged.model.layers[0].mlp.up_proj.weight.dtype == storage
            runs.append((losses, logits, weights, merged(input_ids=ids(2)).logits))
    (l0, y0, w0, m0), (l1, y1, w1, m1) = runs
    assert torch.equal(torch.stack(l0), torch.stack(l1)) and l1[1] < l1[0]
    assert torch.equal(y0, y1) and torch.equal(m0, m1)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_casts_and_kbit_preparation_keep_the_codes(model_dir):
    model = _quantized(model_dir, torch.bfloat16, dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    codes = layer.codes().clone()
    for cast in (nn.Module.half, nn.Module.float, nn.Module.bfloat16, lambda m: m.to(torch.float16),
                 lambda m: m.to("cpu", torch.float32)):
        cast(model)
        assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.codes(), codes)
    model.to(torch.bfloat16)
    peft_fast.prepare_model_for_kbit_training(model)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the other half-precision weights are upcast
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.codes(), codes)
    # A cast nothing guards (what PEFT's own prepare_model_for_kbit_training or an FSDP2 param_dtype would do) is
    # named when the codes are read, rather than computing with garbage.
    layer.weight.data = layer.weight.data.to(torch.float32)
    with pytest.raises(RuntimeError, match="codes are stored as bfloat16 but the weight is now float32.*param_dtype"):
        model(input_ids=ids())


def test_the_byte_view_follows_the_weight(model_dir):
    """The uint8 view of float-stored codes is kept with the weight it came from: replacing the weight's data
    (same dtype and shape, other values) is seen by the next forward."""
    a, b = _quantized(model_dir, torch.float32), copy.deepcopy(LlamaForCausalLM.from_pretrained(model_dir))
    with torch.no_grad():
        b.model.layers[0].self_attn.q_proj.weight.mul_(-1.0)
    b = quantize(b, quant_storage=torch.float32)
    x = torch.randn(3, 64)
    la, lb = a.model.layers[0].self_attn.q_proj, b.model.layers[0].self_attn.q_proj
    assert not torch.equal(la(x), lb(x))
    la.weight.data = lb.weight.data.clone()
    assert torch.equal(la(x), lb(x))


def test_save_and_load_keep_the_storage(model_dir, tmp_path):
    model = _quantized(model_dir, torch.float32)
    settings = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": None}
    save_quantized(model, str(tmp_path / "f32"), settings)
    loaded = peft_fast.load_quantized(str(tmp_path / "f32"))
    assert loaded.model.layers[1].self_attn.v_proj.weight.dtype == torch.float32
    assert torch.equal(loaded(ids()).logits, model(ids()).logits)
    # the config names one storage for every layer: a model whose layers differ is refused before anything is written
    model.model.layers[1].mlp.down_proj = NF4Linear.from_linear(nn.Linear(128, 64), quant_storage=torch.bfloat16)
    os.makedirs(tmp_path / "mixed")
    with pytest.raises(ValueError, match=r"several dtypes \(\['bfloat16', 'float32'\]\)"):
        save_quantized(model, str(tmp_path / "mixed"), settings)
    assert os.listdir(tmp_path / "mixed") == []


def test_bad_storage_is_refused_and_the_model_left_unchanged():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="quant_storage must be one of .*got 'int4'"):
        quantize(model, quant_storage="int4")
    # 3 weights pack into 2 bytes: not a whole float32
    with pytest.raises(ValueError, match=r"1's \(1, 3\) weight packs into 2 bytes, not a multiple of .* 4"):
        quantize(model, quant_storage=torch.float32)
    assert all(type(m) is nn.Linear for m in model)
    quantize(model, quant_storage="bfloat16")  # a name, as config.json writes it
    assert model[0].weight.dtype == model[1].weight.dtype == torch.bfloat16
