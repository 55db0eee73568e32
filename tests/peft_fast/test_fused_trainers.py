"""The fused decoder under the trainers people use: transformers' Trainer (its num_items_in_batch under gradient
accumulation reaches the fused loss) and TRL's SFTTrainer (which puts its own fused LM head around the model's
forward): the same losses as the unfused model, step by step."""
import inspect
import warnings

import pytest
import torch
from tiny_models import peft_fast_only
from tiny_text import TokenRows, llama, text_dataset, tokenizer
from transformers import Trainer, TrainingArguments

import peft_fast

pytestmark = peft_fast_only
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)


def _losses(trainer):
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _model(fused):
    return peft_fast.get_peft_model(llama(), peft_fast.LoraConfig(**LORA), fused=fused)


def test_trainer_with_gradient_accumulation_gives_the_unfused_losses(tmp_path, monkeypatch):
    from peft_fast.fused import loss as loss_ops

    calls = []
    fused_loss = loss_ops.linear_cross_entropy
    monkeypatch.setattr(loss_ops, "linear_cross_entropy",
                        lambda *a, **kw: calls.append(kw.get("num_items_in_batch")) or fused_loss(*a, **kw))

    def run(fused):
        torch.manual_seed(0)
        model = _model(fused)
        # Trainer drops the dataset columns that forward's signature does not name: it must stay the model's.
        assert "input_ids" in inspect.signature(model.forward).parameters
        args = TrainingArguments(output_dir=str(tmp_path / str(fused)), max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                                 save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
        return _losses(Trainer(model=model, args=args, train_dataset=TokenRows()))

    want = run(None)
    assert not calls
    got = run("compile")
    assert len(want) == 3 and len(calls) == 6  # 3 steps of 2 micro-batches, through the fused loss
    assert all(torch.is_tensor(n) for n in calls)  # Trainer's token count for the accumulated batch
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_sft_trainer_gives_the_unfused_losses_and_unfuse_after_it_works():
    trl = pytest.importorskip("trl")

    def trainer(fused, out):
        torch.manual_seed(0)
        args = trl.SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             logging_steps=1, report_to=[], use_cpu=True, max_length=32, disable_tqdm=True,
                             bf16=False, save_strategy="no", seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return trl.SFTTrainer(model=_model(fused), args=args, train_dataset=text_dataset(),
                                  processing_class=tokenizer())

    import tempfile

    with tempfile.TemporaryDirectory() as out:
        want = _losses(trainer(None, out))
        fused = trainer("compile", out)
        got = _losses(fused)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    model = fused.model
    assert peft_fast.fused_parts(model)["loss"] == 1
    # TRL's head wrapped the fused forward (a bound method it keeps): after unfuse that method runs the model's own.
    peft_fast.unfuse(model)
    assert not peft_fast.fused_parts(model)
    ids = torch.randint(4, 30, (2, 9))
    model.train()
    assert model(input_ids=ids, labels=ids).logits is not None
