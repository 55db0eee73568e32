"""Where dequantize-then-cuBLAS beats the fused NF4 GEMM: the data behind kernels/qlora_linear.DEQUANT_MIN_ROWS.

Both sides compute x·dequant(Wq)ᵀ (forward) or dy·dequant(Wq) (the backward's dx) on the same NF4 weight, without
LoRA: `peft_fast` = the fused dequant-in-K-loop Triton GEMM, `peft` column = the Triton dequantization followed by
a torch matmul (cuBLAS). ratio < 1: the fused kernel wins at that many rows. At decode sizes (forward, rows <=
kernels/qlora_linear.GEMV_MAX_ROWS) `gemv_ms` times qlora_gemv, which also does a rank-16 LoRA (so it is, if
anything, handicapped), and `gemv2d_ms` the plain 2-D nf4_gemv (base only): the data behind GEMV_MAX_ROWS. GPU only (the interpreter's timings mean nothing).
"""
import pytest
import torch
import torch.nn.functional as F

from benchutil import DEVICE, ON_GPU, measure, rel_err

pytestmark = pytest.mark.skipif(not ON_GPU, reason="kernel path timings need a GPU")

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
ROWS = [1, 16, 4096]  # the 2026-11-26 H200 run covered 1, 4, 16, 64, 256, 4096: bench/results/


@pytest.mark.parametrize("trans", [False, True], ids=["fwd", "dx"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_qlora_base_paths(benchmark, shape, rows, trans):
    from peft_fast.kernels.nf4 import decode_absmax, dequantize_raw, launch_args, nf4_quantize
    from peft_fast.kernels.qlora_linear import _nf4_mm

    torch.manual_seed(0)
    in_f, out_f = shape
    packed, state = nf4_quantize(torch.randn(out_f, in_f, device=DEVICE) / in_f**0.5, compress_statistics=True)
    flat, absmax, code, nested = launch_args(packed, state, DEVICE)
    a = torch.randn(rows, out_f if trans else in_f, device=DEVICE, dtype=torch.bfloat16)

    def fused():
        return _nf4_mm(a, flat, decode_absmax(absmax, nested), code, out_f, 64, trans=trans)

    def dequant():
        w = dequantize_raw(flat, absmax, code, (out_f, in_f), torch.bfloat16, 64, nested)
        return a @ w if trans else F.linear(a, w)

    also = {}
    if not trans and rows <= 16:
        from peft_fast.kernels.qlora_gemv import qlora_gemv_triton

        lora_a = torch.randn(16, in_f, device=DEVICE) / in_f**0.5
        lora_b = torch.randn(out_f, 16, device=DEVICE) * 1e-3
        also["gemv"] = lambda: qlora_gemv_triton(a, packed, state, None, lora_a, lora_b, 2.0)
        from peft_fast.kernels.nf4_gemv import nf4_gemv_triton

        also["gemv2d"] = lambda: nf4_gemv_triton(a, packed, state, None)

    def note(row):
        if "gemv_ms" not in row:
            return {}
        best = min(row["peft_fast_ms"], row["peft_ms"])
        return {"gemv_vs_best": row["gemv_ms"] / best, "gemv2d_vs_best": row["gemv2d_ms"] / best,
                "note": f"qlora_gemv {row['gemv_ms'] * 1e3:.1f} us, nf4_gemv {row['gemv2d_ms'] * 1e3:.1f} us "
                        f"({row['gemv_ms'] / best:.2f}x, {row['gemv2d_ms'] / best:.2f}x the better GEMM)"}

    measure(benchmark, f"nf4 base {'dx' if trans else 'fwd'} {in_f}x{out_f} M={rows}", fused, dequant,
            baseline="Triton dequantize + cuBLAS", err=rel_err(fused(), dequant()), also=also, extra=note)
