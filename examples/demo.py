"""peft_fast in one minute, on a CPU, with nothing downloaded.

1. Build a tiny Llama from a config and pre-train it briefly on general prose (plain PyTorch, all weights).
2. Save it, then add LoRA with peft_fast (PEFT's API) and fine-tune only the adapter on a lighthouse keeper's log.
3. Save the adapter in PEFT's format, reload it onto a fresh copy of the base, check the logits match,
   generate with and without the adapter, and check that merge_and_unload() gives the same logits.

Run it with `make demo`, or `python examples/demo.py` from anywhere. It exits non-zero if something is off.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from peft_fast import LoraConfig, PeftModel, patch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
OUT = HERE / "out"
SEED = 0
SEQ_LEN, BATCH = 128, 8  # the model only ever sees (and generates within) SEQ_LEN positions


# --- a byte-level tokenizer: token id = byte value, so any text round-trips and nothing is downloaded -------
def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def build_base(seed: int = SEED) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,  # bytes 0 never occur in the text
    )
    return LlamaForCausalLM(config)


def random_batch(data: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - SEQ_LEN, (BATCH,), generator=gen)
    return torch.stack([data[s:s + SEQ_LEN] for s in starts.tolist()])


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, lr: float, every: int) -> list[float]:
    """A plain PyTorch loop: AdamW over whatever requires grad. Returns the average loss of each window."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    window, history, start = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        ids = random_batch(data, gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        if step % every == 0:
            history.append(sum(window) / len(window))
            window = []
            print(f"  step {step:4d}  loss {history[-1]:.3f}  ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return history


@torch.no_grad()
def sample(model, prompt: str) -> str:
    torch.manual_seed(SEED)  # same seed for every call: differences come from the weights alone
    ids = encode(prompt)[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=SEQ_LEN - ids.shape[1],
                         do_sample=True, temperature=0.6, top_k=10, pad_token_id=0)
    return decode(out[0, ids.shape[1]:])


def main() -> int:
    t0 = time.perf_counter()
    hf_logging.disable_progress_bar()
    prose = encode((DATA / "prose.txt").read_text(encoding="utf-8"))
    log = encode((DATA / "keeper_log.txt").read_text(encoding="utf-8"))

    # 1. A base model with something to adapt: pre-train every weight on general prose.
    print(f"1. pre-training a tiny Llama on {len(prose):,} bytes of prose (all weights, plain PyTorch)")
    model = build_base()
    base_losses = train(model, prose, steps=400, lr=3e-3, every=50)
    model.save_pretrained(OUT / "base")

    # 2. LoRA on every linear layer; only the adapter trains.
    print(f"\n2. LoRA fine-tuning on {len(log):,} bytes of a lighthouse keeper's log")
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM")
    model = patch(model, config)  # same as peft_fast.get_peft_model(model, config)
    model.print_trainable_parameters()
    lora_losses = train(model, log, steps=200, lr=3e-3, every=20)
    model.save_pretrained(OUT / "adapter")
    print(f"saved the adapter to {OUT / 'adapter'}: {sorted(p.name for p in (OUT / 'adapter').iterdir())}")

    # 3. Reload the adapter onto a fresh copy of the base model, as a user of the adapter would.
    print("\n3. reloading, generating, merging")
    base = LlamaForCausalLM.from_pretrained(OUT / "base")
    reloaded = PeftModel.from_pretrained(base, OUT / "adapter")
    probe = log[:SEQ_LEN][None]
    with torch.no_grad():
        trained_logits = model(input_ids=probe).logits
        reloaded_logits = reloaded(input_ids=probe).logits
    assert torch.equal(trained_logits, reloaded_logits), "reloaded adapter gives different logits"
    print("reloaded adapter: logits identical to the trained model's")

    prompt = "Day 37. Wind"
    print(f"\nprompt: {prompt!r}")
    print(f"--- with the adapter ---\n{prompt}{sample(reloaded, prompt)}")
    with reloaded.disable_adapter():
        print(f"--- base model (adapter disabled) ---\n{prompt}{sample(reloaded, prompt)}")

    merged = reloaded.merge_and_unload()  # a plain LlamaForCausalLM with the adapter folded into its weights
    assert type(merged) is LlamaForCausalLM
    with torch.no_grad():
        merged_logits = merged(input_ids=probe).logits
    torch.testing.assert_close(merged_logits, trained_logits, rtol=1e-4, atol=1e-4)
    print(f"\nmerge_and_unload(): {type(merged).__name__}, logits match the adapter model's "
          f"(max diff {(merged_logits - trained_logits).abs().max().item():.1e})")

    print(f"\npre-training loss {base_losses[0]:.3f} -> {base_losses[-1]:.3f}, "
          f"LoRA loss {lora_losses[0]:.3f} -> {lora_losses[-1]:.3f}, {time.perf_counter() - t0:.0f} s")
    if not lora_losses[-1] < lora_losses[0]:
        print("FAILED: the LoRA loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
