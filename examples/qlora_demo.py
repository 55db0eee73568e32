"""QLoRA on a CPU with peft_fast, nothing downloaded and no bitsandbytes needed.

1. Take the tiny Llama that examples/demo.py pre-trains (pre-train it here if that demo has not run).
2. peft_fast.quantize(): every linear layer but the output head becomes 4-bit NF4 with double quantization, the
   same bytes bitsandbytes would make, about 1/7 of the float32 size.
3. prepare_model_for_kbit_training (frozen, gradient checkpointing), then LoRA on every linear layer; train only
   the adapter on the lighthouse keeper's log, over the frozen 4-bit base.
4. Save the adapter, reload it onto a freshly quantized base (same logits), then merge_and_unload(dequantize=True)
   into a plain 16/32-bit model (same logits up to float rounding).

Run it with `make demo` (after demo.py), or `python examples/qlora_demo.py`. It exits non-zero if something is off.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import DATA, OUT, SEQ_LEN, build_base, encode, train  # noqa: E402

from peft_fast import (LoraConfig, NF4Linear, PeftModel, get_peft_model,  # noqa: E402
                       prepare_model_for_kbit_training, quantize)

QUANT = dict(quant_type="nf4", double_quant=True)


def nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.no_grad()
def eval_loss(model, data: torch.Tensor) -> float:
    model.eval()
    ids = torch.stack([data[i:i + SEQ_LEN] for i in range(0, 8 * SEQ_LEN, SEQ_LEN)])
    return model(input_ids=ids, labels=ids).loss.item()


def main() -> int:
    t0 = time.perf_counter()
    hf_logging.disable_progress_bar()
    log = encode((DATA / "keeper_log.txt").read_text(encoding="utf-8"))
    if not (OUT / "base").exists():
        print("1. pre-training the tiny Llama of examples/demo.py (it has not run yet)")
        model = build_base()
        train(model, encode((DATA / "prose.txt").read_text(encoding="utf-8")), steps=400, lr=3e-3, every=100)
        model.save_pretrained(OUT / "base")
    dense = LlamaForCausalLM.from_pretrained(OUT / "base")
    dense_loss, dense_bytes = eval_loss(dense, log), nbytes(dense)

    print("2. peft_fast.quantize(): NF4 with double quantization, no bitsandbytes")
    model = quantize(dense, **QUANT)
    n4 = sum(isinstance(m, NF4Linear) for m in model.modules())
    q_loss = eval_loss(model, log)
    print(f"  {n4} linear layers in 4-bit; state dict {dense_bytes / 1e6:.2f} MB -> {nbytes(model) / 1e6:.2f} MB "
          f"(the float32 embedding and head stay); base loss on the log {dense_loss:.3f} (fp32) vs {q_loss:.3f} (NF4)")

    print("\n3. QLoRA: LoRA on every linear layer over the frozen 4-bit base")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05,
                                             task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    losses = train(model, log, steps=80, lr=3e-3, every=20)
    model.save_pretrained(OUT / "qlora_adapter")

    print("\n4. reloading onto a freshly quantized base, then merging into a dense model")
    fresh = quantize(LlamaForCausalLM.from_pretrained(OUT / "base"), **QUANT)
    reloaded = PeftModel.from_pretrained(fresh, OUT / "qlora_adapter")
    probe = log[:SEQ_LEN][None]
    with torch.no_grad():
        trained = model(input_ids=probe).logits
        again = reloaded(input_ids=probe).logits
    assert torch.equal(trained, again), "the reloaded QLoRA adapter gives different logits"
    print("  reloaded adapter: logits identical to the trained model's")
    merged = reloaded.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    with torch.no_grad():
        merged_logits = merged(input_ids=probe).logits
    torch.testing.assert_close(merged_logits, trained, rtol=1e-4, atol=1e-4)
    print(f"  merge_and_unload(dequantize=True): a dense {type(merged).__name__}, logits match "
          f"(max diff {(merged_logits - trained).abs().max().item():.1e})")

    final = eval_loss(merged, log)
    print(f"\nQLoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}; loss on the log: 4-bit base {q_loss:.3f}, "
          f"merged {final:.3f}; {time.perf_counter() - t0:.0f} s")
    if not (losses[-1] < losses[0] and final < q_loss):
        print("FAILED: QLoRA did not lower the loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
