"""Per-kernel GPU times of the lora_linear op at Llama-8B shapes (each LoRA matmul, and the base GEMMs beside them).

Usage on a GPU machine, with peft_fast importable (gpu_check.sh builds such a layout in /tmp/pfpkg):
    PYTHONPATH=/tmp/pfpkg python3 bench/profile_lora_linear.py
Set PEFT_FAST_LORA_DOT=fp32 to time the fp32 dots instead of the 16-bit tensor-core ones.
"""
import torch
from triton.testing import do_bench

from peft_fast.kernels.common.lora_mm import mm


def main(M: int = 4096, r: int = 16) -> None:
    torch.manual_seed(0)
    dev = "cuda"
    for K, N in [(4096, 4096), (4096, 14336), (14336, 4096)]:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        a, b = torch.randn(r, K, device=dev) * 0.02, torch.randn(N, r, device=dev) * 0.02
        z, dz = torch.empty(M, r, device=dev), torch.empty(M, r, device=dev)
        y = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
        dy = torch.randn_like(y)
        da, db, dx = torch.empty_like(a), torch.empty_like(b), torch.empty_like(x)
        cases = {
            "base fwd (cuBLAS)": lambda: torch.nn.functional.linear(x, w),
            "shrink z=x·Aᵀ": lambda: mm(x, a.t(), z),
            "expand y+=s·z·Bᵀ": lambda: mm(z, b.t(), y, scale=2.0, accumulate=True),
            "dB": lambda: mm(dy.t(), z, db, scale=2.0),
            "dz": lambda: mm(dy, b, dz, scale=2.0),
            "dA": lambda: mm(dz.t(), x, da),
            "dx+=": lambda: mm(dz, a, dx, accumulate=True),
            "base dx (cuBLAS)": lambda: dy @ w,
        }
        times = {name: do_bench(fn, return_mode="median") * 1e3 for name, fn in cases.items()}
        print(f"M={M} K={K} N={N} r={r}: " + ", ".join(f"{k} {v:.0f} us" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
