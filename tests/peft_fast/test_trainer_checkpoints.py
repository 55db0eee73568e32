"""transformers.Trainer with a peft_fast model writes what it writes for a PEFT model: adapter-only checkpoints
(PEFT's two files) that Hugging Face PEFT loads, the same from save_model, and resumes from them."""
import os
import warnings

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import peft_fast
from tiny_models import AGAINST_PEFT, assert_close
from tiny_text import TokenRows, llama

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="this is how Trainer sees peft_fast's model (PEFT: its own)")
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json"}


def _trainer(model, out, steps=2, **kw):
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, **kw)
    return Trainer(model=model, args=args, train_dataset=TokenRows())


def _model():
    cfg = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft_fast.get_peft_model(llama(), cfg)


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_checkpoints_and_save_model_are_adapter_only_and_load_in_peft(tmp_path):
    model = _model()
    trainer = _trainer(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.randint(4, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, ids)
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "final"):
        files = set(os.listdir(folder))
        assert ADAPTER_FILES <= files, files
        assert not {"model.safetensors", "pytorch_model.bin"} & files, f"{folder.name} holds the whole model: {files}"
        assert os.path.getsize(folder / "adapter_model.safetensors") < 40_000
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(llama(), str(folder))
        assert_close(_logits(loaded, ids), expected, msg=folder.name)


def test_training_resumes_from_an_adapter_checkpoint(tmp_path):
    """4 steps straight through, and the same run resumed from its checkpoint-2, end at the same adapter."""
    straight = _model()
    _trainer(straight, tmp_path, steps=4, seed=0).train()
    resumed = _model()
    trainer = _trainer(resumed, tmp_path / "again", steps=4, seed=0)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 4
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and a
    for n in a:
        assert_close(b[n], a[n], atol=1e-5, rtol=1e-4, msg=n)
