"""Where the QLoRA layer's time goes on a GPU: kernel times, host overhead per call, and a profiler table, for
peft_fast and for PEFT + bitsandbytes side by side. Prints only; gpu_check.sh keeps its log (profile.log).

Usage on a GPU machine, with peft_fast importable (gpu_check.sh builds such a layout in /tmp/pfpkg):
    PYTHONPATH=/tmp/pfpkg python3 bench/profile_qlora.py
"""
import sys
import time

import torch
from triton.testing import do_bench

import peft_fast
from peft_fast.kernels import nf4_quantize
from peft_fast.kernels.common.nf4_format import launch_args
from peft_fast.kernels.nf4_dequantize import dequantize_raw

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_bench_lora_linear import OneLayer  # noqa: E402


def kernel_times():
    for out_f, in_f in [(4096, 4096), (14336, 4096), (5632, 2048), (256, 2048)]:
        w = torch.randn(out_f, in_f, device="cuda") / in_f**0.5
        packed, state = nf4_quantize(w, compress_statistics=True)
        flat, absmax, code, nested = launch_args(packed, state, "cuda")
        row = {"peft_fast dequant": lambda: dequantize_raw(flat, absmax, code, (out_f, in_f), torch.bfloat16, 64,
                                                           nested)}
        try:
            import bitsandbytes.functional as BF

            bp, qs = BF.quantize_4bit(w.bfloat16(), blocksize=64, compress_statistics=True, quant_type="nf4")
            row["bnb dequantize_4bit"] = lambda: BF.dequantize_4bit(bp, qs)
        except Exception as e:  # no bitsandbytes here: say so, time ours alone
            print(f"  (bitsandbytes unavailable: {type(e).__name__})")
        x = torch.randn(4096, in_f, device="cuda", dtype=torch.bfloat16)
        wb = w.bfloat16()
        row["cuBLAS x·Wᵀ M=4096"] = lambda: torch.nn.functional.linear(x, wb)
        gbytes = (out_f * in_f * 2.5 + out_f * in_f / 64) / 1e9
        parts = []
        for k, fn in row.items():
            us = do_bench(fn, return_mode="median") * 1e3
            extra = f" ({gbytes / (us * 1e-6):.0f} GB/s)" if "dequant" in k else ""
            parts.append(f"{k} {us:.1f} us{extra}")
        print(f"{out_f}x{in_f}: " + ", ".join(parts), flush=True)


def _layers(out_f, in_f):
    import bitsandbytes as bnb
    import peft

    w = torch.randn(out_f, in_f) / in_f**0.5

    def q():
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        return OneLayer(layer.cuda())

    kw = dict(r=16, lora_alpha=32, target_modules=["proj"], init_lora_weights=False, lora_dropout=0.05)
    ours = peft_fast.get_peft_model(q(), peft_fast.LoraConfig(**kw)).train()
    ref = peft.get_peft_model(q(), peft.LoraConfig(**kw)).train()
    dense = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
    quant = peft_fast.get_peft_model(peft_fast.quantize(OneLayer(dense), compute_dtype=torch.bfloat16),
                                     peft_fast.LoraConfig(**kw)).train()
    return {"peft_fast/bnb": ours, "peft_fast/quantize": quant, "peft+bnb": ref}


def host_overhead(out_f=2048, in_f=2048, rows=16):
    """Wall time per training fwd+bwd with a GPU workload too small to matter: the host-side cost of one layer."""
    models = _layers(out_f, in_f)
    x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for name, m in models.items():
        params = [x] + [p for p in m.parameters() if p.requires_grad]
        for _ in range(5):
            torch.autograd.grad(m(x).float().sum(), params)
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 100
        for _ in range(n):
            torch.autograd.grad(m(x).float().sum(), params)
        torch.cuda.synchronize()
        print(f"host fwd+bwd {out_f}x{in_f} M={rows} {name}: {(time.perf_counter() - t0) / n * 1e6:.0f} us/call",
              flush=True)
        with torch.no_grad():
            m.eval()
            xi = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
            for _ in range(5):
                m(xi)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                m(xi)
            torch.cuda.synchronize()
            m.train()
        print(f"host decode M=1 {name}: {(time.perf_counter() - t0) / n * 1e6:.0f} us/call", flush=True)


def profile_tables(out_f=5632, in_f=2048, rows=4096):
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for name, m in _layers(out_f, in_f).items():
        params = [x] + [p for p in m.parameters() if p.requires_grad]
        for _ in range(3):
            torch.autograd.grad(m(x).float().sum(), params)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.autograd.grad(m(x).float().sum(), params)
            torch.cuda.synchronize()
        print(f"\n== {name}: fwd+bwd {out_f}x{in_f} M={rows}, 5 calls", flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60),
              flush=True)


if __name__ == "__main__":
    kernel_times()
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        sys.exit(f"bitsandbytes unavailable ({type(e).__name__}): the layer comparisons need it")
    host_overhead()
    profile_tables()
