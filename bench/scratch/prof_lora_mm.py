import os, sys, torch, triton
sys.path.insert(0, "/tmp/pfpkg")
from peft_fast.kernels import lora_linear as L
LL = sys.modules["peft_fast.kernels.lora_linear"]
from triton.testing import do_bench
torch.manual_seed(0)
d = "cuda"
for (K, N) in [(4096, 4096), (4096, 14336)]:
    M, r = 4096, 16
    x = torch.randn(M, K, device=d, dtype=torch.bfloat16); W = torch.randn(N, K, device=d, dtype=torch.bfloat16) * 0.02
    A = torch.randn(r, K, device=d) * 0.02; B = torch.randn(N, r, device=d) * 0.02
    z = torch.empty(M, r, device=d); y = torch.empty(M, N, device=d, dtype=torch.bfloat16); dy = torch.randn_like(y)
    dz = torch.empty(M, r, device=d); da = torch.empty_like(A); db = torch.empty_like(B); dx = torch.empty_like(x)
    t = {}
    t["base fwd F.linear"] = do_bench(lambda: torch.nn.functional.linear(x, W), return_mode="median")
    t["shrink z=xA^T"] = do_bench(lambda: LL._mm(x, A.t(), z), return_mode="median")
    t["expand y+=zB^T"] = do_bench(lambda: LL._mm(z, B.t(), y, scale=2.0, accumulate=True), return_mode="median")
    t["dB"] = do_bench(lambda: LL._mm(dy.t(), z, db, scale=2.0), return_mode="median")
    t["dz"] = do_bench(lambda: LL._mm(dy, B, dz, scale=2.0), return_mode="median")
    t["dA"] = do_bench(lambda: LL._mm(dz.t(), x, da), return_mode="median")
    t["dx+="] = do_bench(lambda: LL._mm(dz, A, dx, accumulate=True), return_mode="median")
    t["base dx dy@W"] = do_bench(lambda: dy @ W, return_mode="median")
    ref = (x.double() @ W.double().T + 2.0 * (x.double() @ A.double().T) @ B.double().T)
    out = L(x, W, None, A, B, 2.0)
    t["fwd relerr x1e6"] = ((out.double() - ref).norm() / ref.norm()).item() * 1e-3
    torch.set_float32_matmul_precision("high")
    t["shrink tf32"] = do_bench(lambda: LL._mm(x, A.t(), z), return_mode="median")
    t["dA tf32"] = do_bench(lambda: LL._mm(dz.t(), x, da), return_mode="median")
    torch.set_float32_matmul_precision("highest")
    print(f"K={K} N={N}: " + ", ".join(f"{k} {v*1e3:.0f}us" for k, v in t.items()), flush=True)
