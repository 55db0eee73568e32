"""4-bit expert stacks (peft_fast.quantize on a tiny Mixtral, codes stored as uint8 or as bf16 bytes) under the tools
users drive them with: transformers.Trainer (checkpoints, resume, gradient checkpointing), Hugging Face PEFT loading
the adapter onto the dequantized dense model, parameter counts, TRL's SFTTrainer, merging and 4-bit checkpoints,
copies, pickles and module casts."""
import copy
import io
import os
import pickle
import warnings

import pytest
import torch
from moe_models import EXPERTS, dense_twin, moe_base, moe_inputs
from tiny_models import AGAINST_PEFT, assert_close, ref

import peft_fast
from peft_fast.bases.checkpoint import load_quantized, save_quantized
from peft_fast.bases.nf4_experts import is_nf4_experts

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's 4-bit expert stacks (PEFT has none)")
STORAGES = pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16"])
SETTINGS = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": None}
TOL = dict(atol=2e-5, rtol=2e-5)


class Rows(torch.utils.data.Dataset):
    """A fixed token dataset: the same rows in the same order in every run."""

    def __init__(self, n=8, length=8):
        self.rows = torch.randint(1, 64, (n, length), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _qlora(storage, seed=1):
    """(dense base, its dequantized twin, QLoRA model on q_proj and the 4-bit stacks)."""
    base = moe_base("mixtral", torch.float32)
    q = peft_fast.quantize(copy.deepcopy(base), quant_storage=storage)
    dense = dense_twin(base, q)
    torch.manual_seed(seed)
    cfg = peft_fast.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"], target_parameters=list(EXPERTS),
                               init_lora_weights=False, task_type="CAUSAL_LM")
    return base, dense, peft_fast.get_peft_model(q, cfg)


def _step(model, steps=1):
    x = moe_inputs()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        model(**x, labels=x["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def _logits(model):
    with torch.no_grad():
        return model.eval()(**moe_inputs()).logits.float()


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _codes(model):
    """The codes' parameters, as stored (a float quant_storage's values can be NaN: compare them as bytes)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("_nf4")}


def _bytes(t):
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _trainer(model, out, **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                             save_steps=2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, **kw)
    return Trainer(model=model, args=args, train_dataset=Rows())


# --- transformers.Trainer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage,checkpointing", [(torch.uint8, False), (torch.bfloat16, True)],
                         ids=["uint8", "bf16-checkpointing"])
def test_trainer_resumed_run_ends_where_the_straight_run_does(tmp_path, storage, checkpointing):
    kw = dict(gradient_checkpointing=checkpointing, optim="adamw_torch")
    if checkpointing:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    _, _, straight = _qlora(storage)
    codes = _codes(straight)
    first = _adapter(straight)
    t = _trainer(straight, tmp_path / "a", **kw)
    t.train()
    assert straight.base_model.model.model.gradient_checkpointing is checkpointing
    assert all(not torch.equal(first[n], p) for n, p in _adapter(straight).items())  # every adapter tensor trained
    assert all(torch.equal(_bytes(codes[n]), _bytes(p)) for n, p in _codes(straight).items())  # frozen
    files = set(os.listdir(tmp_path / "a" / "checkpoint-2"))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files
    _, _, resumed = _qlora(storage, seed=7)  # other initial adapter weights: the checkpoint must replace them
    r = _trainer(resumed, tmp_path / "b", **kw)
    r.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert r.state.global_step == 4
    losses = [[h["loss"] for h in tr.state.log_history if "loss" in h] for tr in (t, r)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    for n in a:
        assert_close(b[n], a[n], atol=0, rtol=0, msg=n)


# --- the saved adapter in Hugging Face PEFT and back in peft_fast ------------------------------------------------
@STORAGES
def test_adapter_loads_in_peft_on_the_dense_twin_and_back_in_peft_fast(tmp_path, storage):
    base, dense, model = _qlora(storage)
    want = _logits(_step(model))
    model.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ref.PeftModel.from_pretrained(dense, str(tmp_path))
    assert_close(_logits(theirs), want, **TOL)
    for other in (storage, torch.float32):  # onto a fresh 4-bit base, same or another quant_storage
        fresh = peft_fast.quantize(copy.deepcopy(base), quant_storage=other)
        mine = peft_fast.PeftModel.from_pretrained(fresh, str(tmp_path))
        assert torch.equal(_logits(mine), want)


# --- parameter counts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32], ids=["uint8", "bf16", "f32"])
def test_trainable_parameter_counts_are_peft_s_on_the_dense_model(storage, capsys):
    base, dense, model = _qlora(storage)
    torch.manual_seed(1)
    theirs = ref.get_peft_model(dense, ref.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"],
                                                      target_parameters=list(EXPERTS)))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    theirs.print_trainable_parameters()
    mine_line, their_line = capsys.readouterr().out.strip().splitlines()
    assert mine_line == their_line
    assert model.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)
    # bytes: the codes at 4 bits per weight whatever dtype holds them
    q = model.base_model.model
    footprint = q.get_memory_footprint()
    codes = sum(p.numel() * p.element_size() for n, p in q.named_parameters() if n.endswith("_nf4"))
    stack_weights = sum(m.nf4_state(n).shape.numel() for m in q.modules() if is_nf4_experts(m) for n in m._nf4_names)
    assert codes == stack_weights // 2 and footprint < base.get_memory_footprint() / 2


@STORAGES
def test_num_parameters_counts_4bit_codes_unpacked_as_peft_does(storage):
    """transformers' num_parameters (Trainer's total_flos, the loggers' model size) unpacks bitsandbytes' Params4bit
    only; the adapter model's own counts peft_fast's codes as their weights whatever dtype holds them."""
    base, _, model = _qlora(storage)
    trainable, total = model.get_nb_trainable_parameters()
    assert model.num_parameters() == total and model.num_parameters(only_trainable=True) == trainable
    embed = base.model.embed_tokens.weight.numel()
    assert model.num_parameters(exclude_embeddings=True) == total - embed


# --- TRL ----------------------------------------------------------------------------------------------------------
def test_sft_trainer_trains_and_saves_a_qlora_model_over_4bit_stacks(tmp_path):
    trl = pytest.importorskip("trl")
    from tiny_text import text_dataset, tokenizer

    _, dense, model = _qlora(torch.bfloat16)
    model.config.pad_token_id = 0
    before = _adapter(model)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         save_steps=2, logging_steps=1, report_to=[], use_cpu=True, max_length=32, disable_tqdm=True,
                         bf16=False, gradient_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=tokenizer())
    trainer.train()
    assert trainer.model is model
    assert all(not torch.equal(before[n], p) for n, p in _adapter(model).items())
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        files = set(os.listdir(folder))
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ref.PeftModel.from_pretrained(dense, str(tmp_path / "final"))
    assert_close(_logits(theirs), _logits(model), **TOL)


# --- merging and 4-bit checkpoints --------------------------------------------------------------------------------
@STORAGES
def test_trained_merged_model_round_trips_through_save_and_load_quantized(tmp_path, storage):
    base, _, model = _qlora(storage)
    _step(model, 2)
    unmerged = _logits(model)
    # the base alone as a 4-bit checkpoint, plus the adapter: the trained model
    model.save_pretrained(str(tmp_path / "adapter"))
    save_quantized(peft_fast.quantize(copy.deepcopy(base), quant_storage=storage), str(tmp_path / "base"), SETTINGS)
    again = peft_fast.PeftModel.from_pretrained(load_quantized(str(tmp_path / "base")), str(tmp_path / "adapter"))
    assert torch.equal(_logits(again), unmerged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    stacks = [m for m in merged.modules() if is_nf4_experts(m)]
    assert stacks and all(m._parameters[f"{n}_nf4"].dtype == storage for m in stacks for n in m._nf4_names)
    want = _logits(merged)
    assert (want - unmerged).abs().max() < 0.5 * unmerged.abs().max()  # re-quantized: 4-bit rounding
    save_quantized(merged, str(tmp_path / "merged"), SETTINGS)
    loaded = load_quantized(str(tmp_path / "merged"))
    assert all(p.dtype == storage for n, p in loaded.named_parameters() if n.endswith("_nf4"))
    assert torch.equal(_logits(loaded), want)


def test_a_merged_4bit_model_saves_with_save_quantized_and_its_own_settings(tmp_path):
    """transformers' save_pretrained cannot write peft_fast's 4-bit layers (the layers share one double-quantization
    codebook, which it refuses, and Mixtral's weight conversion cannot split 4-bit stacks): peft_fast.save_quantized
    writes the transformers 4-bit checkpoint, reading the settings from the layers. An adapter model is refused
    before anything is written."""
    _, _, model = _qlora(torch.uint8)
    with pytest.raises(ValueError, match="has adapter layers.*merge_and_unload"):
        peft_fast.save_quantized(model, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    peft_fast.save_quantized(merged, str(tmp_path / "merged"))
    assert torch.equal(_logits(load_quantized(str(tmp_path / "merged"))), _logits(merged))
    peft_fast.save_quantized(model, str(tmp_path / "wrapper"))  # the adapter model, merged in place: its base
    assert torch.equal(_logits(load_quantized(str(tmp_path / "wrapper"))), _logits(merged))
    with pytest.raises(ValueError, match="no 4-bit layers"):
        peft_fast.save_quantized(moe_base("mixtral", torch.float32), str(tmp_path / "dense"))
    mixed = peft_fast.quantize(moe_base("mixtral", torch.float32), experts=False, double_quant=False)
    peft_fast.bases.nf4_experts.quantize_experts(mixed.model.layers[0].mlp.experts)
    with pytest.raises(ValueError, match=r"differ in \{'double_quant': \['False', 'True'\]\}"):
        peft_fast.save_quantized(mixed, str(tmp_path / "mixed"))
    assert not (tmp_path / "dense").exists() and not (tmp_path / "mixed").exists()


# --- copies, pickles, casts ---------------------------------------------------------------------------------------
@STORAGES
def test_copies_and_casts_keep_the_codes_and_the_forward(storage):
    _, _, model = _qlora(storage)
    _step(model)
    want = _logits(model)
    codes = {n: _bytes(p) for n, p in _codes(model).items()}

    def kept(m):
        got = _codes(m)
        return got.keys() == codes.keys() and all(
            p.dtype == storage and torch.equal(_bytes(p), codes[n])
            for n, p in got.items())

    twin = copy.deepcopy(model)
    assert kept(twin) and torch.equal(_logits(twin), want)
    for back in (pickle.loads(pickle.dumps(model)), _torch_round_trip(model)):
        assert kept(back) and torch.equal(_logits(back), want)
    for cast, tol in ((lambda m: m.to(torch.bfloat16), 2e-2), (lambda m: m.half(), 2e-3),
                      (lambda m: m.half().float(), 2e-3), (lambda m: m.to("cpu", torch.float32), 0)):
        m = cast(copy.deepcopy(model))
        assert kept(m)
        assert_close(_logits(m), want, atol=tol, rtol=tol)


def _torch_round_trip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("adapter", [False, True], ids=["quantized", "qlora"])
def test_torch_save_of_a_model_with_float_stored_codes_after_a_forward(adapter):
    """A forward caches uint8 views of float-stored codes (NF4Linear's and the stacks'): they alias the codes as
    another dtype, which torch.save refuses, so pickles leave them out (a copy rebuilds them)."""
    base = peft_fast.quantize(moe_base("mixtral", torch.float32), quant_storage=torch.bfloat16)
    model = _qlora(torch.bfloat16)[2] if adapter else base
    want = _logits(model)
    assert torch.equal(_logits(_torch_round_trip(model)), want)


@STORAGES
def test_module_type_cast_keeps_the_codes(storage):
    """Module.type(dtype), unlike .half() and .to(dtype), converts integer tensors too: the codes' bytes are kept."""
    q = peft_fast.quantize(moe_base("mixtral", torch.float32), quant_storage=storage)
    want = _logits(q)
    q.type(torch.float16)
    assert_close(_logits(q), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_4bit_state_on_the_meta_device_is_not_saved_and_says_why(double_quant):
    """Accelerate's FSDP2 cpu_ram_efficient_loading moves the model to meta and reloads it by state-dict keys, which
    cannot reach 4-bit quant states (tests/peft_fast/test_distributed.py runs it): the error names the setting."""
    q = peft_fast.quantize(moe_base("mixtral", torch.float32), double_quant=double_quant).to("meta")
    with pytest.raises(RuntimeError, match="meta device cannot be saved.*cpu_ram_efficient_loading=False"):
        q.state_dict()
