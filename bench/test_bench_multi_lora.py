"""Mixed-adapter batches (`adapter_names=`, one adapter per sample): peft_fast's stacked shrink/expand against
Hugging Face PEFT, which loops over the adapters present in the batch (gather, two matmuls, scatter, each).

1. Model level, CPU and GPU: a Llama from LlamaConfig (no downloads) decoding one token for each of 32 sequences
   (input_ids [32, 1], no KV cache), eval + no_grad, with 1, 4, 16 or 32 distinct adapters on all linear layers
   (r=16 alone; ranks mixed 8..64 otherwise). Baseline: PEFT's `adapter_names` on an identical copy with the same
   adapter weights. Also timed, in the same interleaved rounds: the plain base model (an untouched copy, no LoRA
   wrappers), the common denominator of both LoRA overheads, overhead = (time - base) / base. The times include
   the embedding and lm_head (vocab 32000 on GPU), which dilute the overhead of a 2-layer stack somewhat.
2. Kernel level, GPU only: one `multi_lora` call on 4096x4096 and 4096x14336 layers (bf16 activations, fp32
   adapter stacks as the layers cache them, r_max 64), 64 decode tokens with 1, 8 or 64 distinct adapters and an
   8x512-token prefill with 8. Baseline: the PEFT-style loop over the same weights, in PEFT's dtypes. Both sides
   add into y in place (multi_lora(inplace=True)), as a layer does with its fresh base output. Also timed:
   `lora_shrink` and `lora_expand` alone, and both sides on a single-adapter batch of the same shape (same stacks,
   every token on the rank-64 slot); the rows record the ratio to it (target: 64 adapters <= 1.3x one; recorded,
   not asserted) and the bandwidth achieved on the bytes the batch needs:
     multi_lora : sum_{adapters a present} r_a*(in+out)*s_w + T*in*s_x + 2*T*out*s_y
     lora_shrink: sum_a r_a*in*s_w  + T*in*s_x + T*r_max*4              (z written in fp32)
     lora_expand: sum_a r_a*out*s_w + T*r_max*4 + 2*T*out*s_y           (y read, y + delta written)
   with s_w, s_x, s_y the element sizes of the adapter stacks, x and y, and T the number of tokens; metadata and
   the zero padding of ranks below r_max are not counted (a kernel that reads them is charged for it in time).
"""
import copy
import math
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import peft_fast
from benchutil import ALPHA, BASE_DTYPE, DEVICE, ON_GPU, both_sides, measure, rel_err

BASELINE = f"peft {peft.__version__} adapter_names"
MIXED_RANKS = (64, 8, 32, 16, 48, 24, 56, 40)  # adapter i gets MIXED_RANKS[i % 8]: slot 0 has r_max = 64
SINGLE_RANK = 16

# --- model level ---------------------------------------------------------------------------------------------------
if ON_GPU:
    MODEL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=2, vocab_size=32000)
else:
    MODEL = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4,
                 num_hidden_layers=4, vocab_size=1024)
SEQS = 32
ADAPTER_COUNTS = (1, 4, 16, 32)


def _names_ranks(n: int) -> list[tuple[str, int]]:
    return [(f"a{i:02d}", SINGLE_RANK if n == 1 else MIXED_RANKS[i % len(MIXED_RANKS)]) for i in range(n)]


def _models(n: int):
    """(plain base, peft_fast model, PEFT model): identical bases; both adapted models hold the same n adapters."""
    config = LlamaConfig(**MODEL, max_position_embeddings=64, attn_implementation="sdpa")
    with torch.device(DEVICE):  # initialise in place: a CPU-side init of the GPU model takes seconds
        base = LlamaForCausalLM(config).to(BASE_DTYPE)
    fast_base, ref_base = copy.deepcopy(base), copy.deepcopy(base)
    adapters = _names_ranks(n)

    def cfg(cls, r):  # random B (not zeros): the outputs then depend on which adapter each sample gets
        return cls(r=r, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)

    (first, r0), rest = adapters[0], adapters[1:]
    fast = peft_fast.get_peft_model(fast_base, cfg(peft_fast.LoraConfig, r0), adapter_name=first)
    ref = peft.get_peft_model(ref_base, cfg(peft.LoraConfig, r0), adapter_name=first)
    for name, r in rest:
        fast.add_adapter(name, cfg(peft_fast.LoraConfig, r))
        ref.add_adapter(name, cfg(peft.LoraConfig, r))
    lora = {k: v for k, v in fast.state_dict().items() if "lora_" in k}
    res = ref.load_state_dict(lora, strict=False)
    missing = [k for k in res.missing_keys if "lora_" in k]
    assert lora and not missing and not res.unexpected_keys, (
        f"adapter keys differ: PEFT only {missing[:5]}, peft_fast only {res.unexpected_keys[:5]}")
    for m in (base, fast, ref):
        m.eval()
    return base, fast, ref, [name for name, _ in adapters]


def _forward(model, ids, names=None):
    kw = {} if names is None else {"adapter_names": names}

    def run():
        with torch.no_grad():
            return model(input_ids=ids, **kw).logits
    return run


def _overheads(row: dict) -> dict:
    base = row["base_ms"]
    fast_ovh, ref_ovh = (row["peft_fast_ms"] - base) / base, (row["peft_ms"] - base) / base
    return {"peft_fast_overhead": fast_ovh, "peft_overhead": ref_ovh,
            "note": f"base {base:.3f} ms | LoRA overhead peft_fast {fast_ovh:+.0%}, peft {ref_ovh:+.0%}"}


@both_sides
@pytest.mark.parametrize("n_adapters", ADAPTER_COUNTS)
def test_multi_lora_decode_model(benchmark, impl, n_adapters):
    torch.manual_seed(0)
    base, fast, ref, names = _models(n_adapters)
    ids = torch.randint(0, MODEL["vocab_size"], (SEQS, 1), device=DEVICE)
    per_seq = [names[i % n_adapters] for i in range(SEQS)]  # sequences interleave adapters, as in serving

    got, want, plain = _forward(fast, ids, per_seq)(), _forward(ref, ids, per_seq)(), _forward(base, ids)()
    effect = rel_err(want, plain)
    if effect < 1e-3:
        warnings.warn(f"adapters barely change the logits ({effect:.1e}): the LoRA path may not be exercised")
    ranks = sorted({r for _, r in _names_ranks(n_adapters)})
    label = (f"multi_lora llama h{MODEL['hidden_size']} L{MODEL['num_hidden_layers']} decode {SEQS}x1 "
             f"adapters={n_adapters}")

    def extra(row):  # one decode step makes SEQS tokens: tokens/s by adapter count is what --pf-charts plots
        tps = {f"{k}tokens_per_s": SEQS / (row[f"{side}_ms"] * 1e-3)
               for k, side in (("", "peft_fast"), ("peft_", "peft"), ("base_", "base"))}
        return {**_overheads(row), "n_adapters": n_adapters, "ranks": ranks, "lora_effect": effect, **tps}

    measure(benchmark, impl, label, _forward(fast, ids, per_seq), _forward(ref, ids, per_seq), baseline=BASELINE,
            err=rel_err(got, want), also={"base": _forward(base, ids)}, extra=extra)


# --- kernel level (GPU only) ---------------------------------------------------------------------------------------
KERNEL_SHAPES = [(4096, 4096), (4096, 14336)]
KERNEL_CASES = [("decode", 64, 1), ("decode", 64, 8), ("decode", 64, 64), ("prefill", 8 * 512, 8)]
R_MAX = max(MIXED_RANKS)


def _stacks(n: int, in_f: int, out_f: int):
    """Adapter stacks laid out as the layers cache them: fp32, zero-padded to r_max, ranks and scalings per slot."""
    ranks = [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(n)]
    a = torch.zeros(n, R_MAX, in_f, device=DEVICE)
    b = torch.zeros(n, out_f, R_MAX, device=DEVICE)
    for i, r in enumerate(ranks):
        a[i, :r] = torch.randn(r, in_f, device=DEVICE) / math.sqrt(in_f)
        b[i, :, :r] = torch.randn(out_f, r, device=DEVICE) / math.sqrt(r)
    scalings = [ALPHA / r for r in ranks]
    return (a, b, torch.tensor(ranks, dtype=torch.int32, device=DEVICE),
            torch.tensor(scalings, dtype=torch.float32, device=DEVICE), ranks, scalings)


def _peft_loop(x, y, a, b, ranks, scalings, token_slots):
    """What PEFT's _mixed_batch_forward does per adapter present: x[rows] cast to the adapter dtype, lora_B(lora_A(.))
    * scaling, cast back and added into result[rows]. Row indices are device tensors built beforehand (PEFT builds
    Python lists per layer per call), so this baseline is, if anything, faster than PEFT itself."""
    groups = []
    for slot in torch.unique(token_slots).tolist():
        r = ranks[slot]
        rows = torch.nonzero(token_slots == slot).flatten()
        groups.append((rows, a[slot, :r].contiguous(), b[slot, :, :r].contiguous(), scalings[slot]))

    def run():
        for rows, wa, wb, s in groups:
            sub = x[rows].to(wa.dtype)
            y[rows] += (F.linear(F.linear(sub, wa), wb) * s).to(y.dtype)
        return y
    return run


def _bytes(tokens: int, in_f: int, out_f: int, present_ranks: list[int], w_size: int, x_size: int, y_size: int):
    rsum = sum(present_ranks)
    z = tokens * R_MAX * 4
    return {"multi_lora": rsum * (in_f + out_f) * w_size + tokens * in_f * x_size + 2 * tokens * out_f * y_size,
            "shrink": rsum * in_f * w_size + tokens * in_f * x_size + z,
            "expand": rsum * out_f * w_size + z + 2 * tokens * out_f * y_size}


@both_sides
@pytest.mark.skipif(not ON_GPU, reason="GPU only: times the Triton multi_lora launches against a PEFT-style loop; "
                                        "on CPU multi_lora is the PyTorch reference, which the model-level "
                                        "benchmark above already exercises")
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0]}-T{c[1]}-n{c[2]}")
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_multi_lora_kernel(benchmark, impl, shape, case):
    from peft_fast import kernels as K

    torch.manual_seed(0)
    in_f, out_f = shape
    kind, tokens, n = case
    a, b, ranks_t, scal_t, ranks, scalings = _stacks(n, in_f, out_f)
    if kind == "prefill":  # n sequences of tokens // n, each with its own adapter
        token_slots = torch.arange(n, device=DEVICE, dtype=torch.int32).repeat_interleave(tokens // n)
    else:  # one token per sequence, adapters interleaved
        token_slots = torch.arange(tokens, device=DEVICE, dtype=torch.int32) % n
    x = torch.randn(tokens, in_f, device=DEVICE, dtype=BASE_DTYPE)
    y = torch.randn(tokens, out_f, device=DEVICE, dtype=BASE_DTYPE)
    meta = K.make_lora_batch_meta(token_slots, n)  # once per batch, shared by every layer: not timed
    one_slots = torch.zeros_like(token_slots)  # the single-adapter batch: same stacks, every token on slot 0
    one_meta = K.make_lora_batch_meta(one_slots, n)

    got = K.multi_lora(x, y.clone(), a, b, ranks_t, scal_t, meta)
    want = _peft_loop(x, y.clone(), a, b, ranks, scalings, token_slots)()
    # On the LoRA delta alone: y itself would hide errors in it.
    err = rel_err(got.double() - y.double(), want.double() - y.double())
    z = K.lora_shrink(x, a, ranks_t, meta)

    def fast():
        return K.multi_lora(x, y, a, b, ranks_t, scal_t, meta, inplace=True)

    also = {"shrink": lambda: K.lora_shrink(x, a, ranks_t, meta),
            "expand": lambda: K.lora_expand(y, z, b, ranks_t, scal_t, meta)}
    if n > 1:
        also["one_adapter_peft_fast"] = lambda: K.multi_lora(x, y, a, b, ranks_t, scal_t, one_meta, inplace=True)
        also["one_adapter_peft"] = _peft_loop(x, y, a, b, ranks, scalings, one_slots)

    present = [ranks[s] for s in torch.unique(token_slots).tolist()]
    nbytes = _bytes(tokens, in_f, out_f, present, a.element_size(), x.element_size(), y.element_size())
    one_bytes = _bytes(tokens, in_f, out_f, [ranks[0]], a.element_size(), x.element_size(), y.element_size())

    def extra(row):
        gbs = {k: nbytes[k] / (row[f"{k}_ms" if k != "multi_lora" else "peft_fast_ms"] * 1e-3) / 1e9
               for k in nbytes}
        out = {"n_adapters": n, "tokens": tokens, "tokens_per_s": tokens / (row["peft_fast_ms"] * 1e-3),
               "peft_tokens_per_s": tokens / (row["peft_ms"] * 1e-3), "bytes": nbytes,
               "peft_fast_gb_s": gbs["multi_lora"],
               "peft_gb_s": nbytes["multi_lora"] / (row["peft_ms"] * 1e-3) / 1e9,
               "shrink_gb_s": gbs["shrink"], "expand_gb_s": gbs["expand"]}
        note = (f"{nbytes['multi_lora'] / 1e6:.1f} MB | GB/s peft_fast {out['peft_fast_gb_s']:.0f} "
                f"(shrink {out['shrink_gb_s']:.0f}, expand {out['expand_gb_s']:.0f}), peft {out['peft_gb_s']:.0f}")
        if n > 1:
            out["vs_one_adapter_peft_fast"] = row["peft_fast_ms"] / row["one_adapter_peft_fast_ms"]
            out["vs_one_adapter_peft"] = row["peft_ms"] / row["one_adapter_peft_ms"]
            out["one_adapter_bytes"] = one_bytes["multi_lora"]
            note += (f" | vs 1 adapter (r{ranks[0]}): peft_fast {out['vs_one_adapter_peft_fast']:.2f}x "
                     f"(target <= 1.3), peft {out['vs_one_adapter_peft']:.2f}x")
        out["note"] = note
        return out

    label = f"multi_lora kernel {in_f}x{out_f} {kind} T={tokens} adapters={n}"
    measure(benchmark, impl, label, fast, _peft_loop(x, y, a, b, ranks, scalings, token_slots),
            baseline="PEFT-style loop (gather, fp32 A then B, scatter)", err=err, also=also, extra=extra)
