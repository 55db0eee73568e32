"""TRL's SFTTrainer with peft_fast: given a peft_fast model, or given a PEFT config inside patch_peft() (TRL builds
the PEFT model itself and it runs on peft_fast's kernels); checkpoints are PEFT's adapter files either way."""
import os
import warnings

import peft
import pytest
import torch

trl = pytest.importorskip("trl")

import peft_fast  # noqa: E402
from tiny_models import AGAINST_PEFT, assert_close  # noqa: E402
from tiny_text import llama, text_dataset, tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="how TRL sees peft_fast (PEFT: its own models)")
TARGETS = ["q_proj", "v_proj"]


def _sft(out, model, **kw):
    # bf16=False: TRL's default autocasts the trained model's forward to bf16 for good, which would hide a float32
    # comparison of the saved adapter with the model
    args = trl.SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         save_steps=2, logging_steps=1, report_to=[], use_cpu=True, max_length=32, disable_tqdm=True,
                         bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=tokenizer(), **kw)


def _adapter_only(folder):
    files = set(os.listdir(folder))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files, files
    assert not {"model.safetensors", "pytorch_model.bin"} & files, files


def _loads_in_peft(folder, model):
    ids = torch.randint(4, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(llama(), str(folder))
    with torch.no_grad():
        assert_close(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_sft_trainer_trains_a_peft_fast_model(tmp_path):
    model = peft_fast.get_peft_model(llama(), peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = _sft(tmp_path, model)
    trainer.train()
    assert trainer.model is model
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    _adapter_only(tmp_path / "checkpoint-2")
    trainer.save_model(str(tmp_path / "final"))
    _adapter_only(tmp_path / "final")
    _loads_in_peft(tmp_path / "final", model)


@pytest.mark.parametrize("lib", [peft, peft_fast], ids=["peft", "peft_fast"])
def test_trl_refuses_an_adapter_on_lm_head_as_for_peft(lib, tmp_path):
    """TRL computes its losses from lm_head.weight directly, so an adapter there would never train: it refuses
    models whose output embedding is a PEFT adapter layer, which peft_fast's layers count as (tuners/base_layer.py).
    Without that, the lm_head adapter stayed untrained, unnoticed, and was saved as if trained."""
    model = lib.get_peft_model(llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        _sft(tmp_path, model)
    names = peft_fast.peft_interop.peft_layer_names(model)  # what patch() would convert: PEFT's layers only
    assert names == [] if lib is peft_fast else "lm_head" in {n.rpartition(".")[2] for n in names}


def test_sft_trainer_refuses_a_peft_fast_config_and_says_what_to_pass(tmp_path):
    """TRL checks peft_config against PEFT's class before it builds anything; its message names peft.LoraConfig,
    which is what to pass (see the next test for running it on peft_fast's kernels)."""
    cfg = peft_fast.LoraConfig(r=4, target_modules=TARGETS)
    with pytest.raises((TypeError, ValueError), match=r"peft\.(Peft|Lora)Config"):
        _sft(tmp_path, llama(), peft_config=cfg)


def test_sft_trainer_with_a_peft_config_inside_patch_peft(tmp_path):
    cfg = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS).to_peft()
    assert isinstance(cfg, peft.LoraConfig) and cfg.r == 4 and cfg.target_modules == set(TARGETS)
    with peft_fast.patch_peft():
        trainer = _sft(tmp_path, llama(), peft_config=cfg)
    assert isinstance(trainer.model, peft.PeftModel) and not isinstance(trainer.model, peft_fast.PeftModel)
    assert len(peft_fast.patched_layers(trainer.model)) == 4
    trainer.train()
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _adapter_only(tmp_path / "checkpoint-2")
    _loads_in_peft(tmp_path / "checkpoint-2", trainer.model)
