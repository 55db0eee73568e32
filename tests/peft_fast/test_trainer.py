"""transformers.Trainer trains a patched model: the loss falls and only adapter weights move."""
import inspect

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peft_fast


class _Copies(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8, vocab=32):
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_trains_only_the_adapter(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=32))
    model = peft_fast.patch(base, peft_fast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    # Trainer's remove_unused_columns reads forward's signature: it must be the base model's, not (*args, **kwargs).
    assert "input_ids" in inspect.signature(model.forward).parameters
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Copies())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
