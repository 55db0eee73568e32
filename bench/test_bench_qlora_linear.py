"""One QLoRA layer: peft_fast over a bitsandbytes NF4 `Linear4bit` against PEFT over an identical one.

Baselines, measured in the same run: PEFT + bitsandbytes (`peft` columns), and a bf16 LoRA layer of the same shape
run by peft_fast (`bf16_lora_ms`), the speed QLoRA gives up to save memory. Llama-3-8B shapes on a GPU; on a CPU one
small layer, for correctness of the harness only (4-bit speed on a CPU is not a goal). Skipped, saying why, where
bitsandbytes is missing or cannot quantize on this device.
"""
import peft
import pytest
import torch

from benchutil import BASE_DTYPE, DEVICE, ON_GPU, both_sides, inference, measure, rel_err
from peft_fast.kernels import settings
from test_bench_lora_linear import DECODE_TOKENS, SHAPES, TOKENS, _fwd_bwd, _linear, _pair

HBM_GBPS = {"H100": 3350, "H200": 4800}  # the card's HBM bandwidth (SXM datasheets), for the bandwidth fraction


def _hbm_gbps() -> float | None:
    name = torch.cuda.get_device_name() if ON_GPU else ""
    return next((v for k, v in HBM_GBPS.items() if k in name), None)


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: the PEFT + bitsandbytes QLoRA "
                                                      "baseline cannot run, so this benchmark is skipped")


def _nf4_linear(weight: torch.Tensor):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=BASE_DTYPE,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False, quant_type="nf4")
    return layer.to(DEVICE)  # quantizes here, deterministically: both copies get the same codes


def _qlora_pair(shape):
    bnb = _bnb()
    torch.manual_seed(0)
    in_f, out_f = shape
    dense = _linear(in_f, out_f)
    try:
        bases = _nf4_linear(dense.weight), _nf4_linear(dense.weight)
    except Exception as e:  # bitsandbytes builds without this device's backend
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantize on {DEVICE}: {type(e).__name__}: {e}")
    fast, ref = _pair(bases[0], 0.0, base_copy=bases[1])
    bf16, _ = _pair(dense, 0.0)  # the same shape in 16-bit, through peft_fast: what QLoRA is compared with
    return fast, ref, bf16, f"peft {peft.__version__} + bitsandbytes {bnb.__version__} NF4"


@both_sides
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_qlora_linear_fwd_bwd(benchmark, impl, shape):
    fast, ref, bf16, baseline = _qlora_pair(shape)
    in_f, out_f = shape
    for m in (fast, ref, bf16):
        m.train()
    x = torch.randn(1, TOKENS, in_f, device=DEVICE, dtype=BASE_DTYPE, requires_grad=True)
    gy = torch.randn(1, TOKENS, out_f, device=DEVICE, dtype=BASE_DTYPE)
    with torch.no_grad():
        err = rel_err(fast(x), ref(x))

    def vs_bf16(row):
        return {"vs_bf16_lora": row["peft_fast_ms"] / row["bf16_lora_ms"],
                "note": f"{row['peft_fast_ms'] / row['bf16_lora_ms']:.2f}x the bf16 LoRA layer"}

    measure(benchmark, impl, f"qlora_linear fwd+bwd {in_f}x{out_f} M={TOKENS}", _fwd_bwd(fast, x, gy),
            _fwd_bwd(ref, x, gy), baseline=baseline, err=err, also={"bf16_lora": _fwd_bwd(bf16, x, gy)},
            extra=vs_bf16)


@both_sides
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_qlora_linear_decode(benchmark, impl, shape, tokens):
    fast, ref, bf16, baseline = _qlora_pair(shape)
    in_f, out_f = shape
    for m in (fast, ref, bf16):
        m.eval()
    x = torch.randn(tokens, 1, in_f, device=DEVICE, dtype=BASE_DTYPE)  # `tokens` sequences, one new token each

    err = rel_err(inference(fast, x)(), inference(ref, x)())
    nf4_bytes = in_f * out_f / 2 + in_f * out_f / 64 * 4  # codes + float32 absmax (before double quant)

    def gemv():  # the same layer with PEFT_FAST_NF4_DECODE=gemv: the codes read once, no transient weight
        with settings.override(nf4_decode="gemv"):
            return inference(fast, x)()

    def bandwidth(row):
        gbps = nf4_bytes / (row["peft_fast_ms"] * 1e-3) / 1e9
        gemv_gbps = nf4_bytes / (row["gemv_ms"] * 1e-3) / 1e9
        peak = _hbm_gbps()
        out = {"nf4_gbps": gbps, "gemv_nf4_gbps": gemv_gbps,
               "speedup_vs_bnb_peft": row["peft_ms"] / row["peft_fast_ms"],
               "gemv_speedup_vs_bnb_peft": row["peft_ms"] / row["gemv_ms"]}
        out["note"] = (f"{gbps:.0f} GB/s on the NF4 bytes; with nf4_decode=gemv {row['gemv_ms']:.3f} ms, "
                       f"{gemv_gbps:.0f} GB/s, {out['gemv_speedup_vs_bnb_peft']:.2f}x PEFT+bnb (target >= 2)")
        if peak:
            out["hbm_fraction"] = gbps / peak
            out["gemv_hbm_fraction"] = gemv_gbps / peak
            out["note"] += f" ({100 * gemv_gbps / peak:.0f}% of {peak} GB/s, target 70% at M=1)"
        return out

    with settings.override(nf4_decode="gemv"):
        gemv_err = rel_err(inference(fast, x)(), inference(ref, x)())
    if gemv_err > max(err, 1e-12) * 10 + 2e-2:
        raise AssertionError(f"the NF4 GEMV path is off: rel err {gemv_err:.2e} against PEFT+bnb (dequant: {err:.2e})")
    measure(benchmark, impl, f"qlora_linear decode {in_f}x{out_f} M={tokens}", inference(fast, x), inference(ref, x),
            baseline=baseline, err=err, also={"bf16_lora": inference(bf16, x), "gemv": gemv}, extra=bandwidth)
