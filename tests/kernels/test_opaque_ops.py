"""The forward-only kernel calls that torch.compile sees as custom ops (common/autograd.OpaqueOp): NF4
dequantization, the NF4 GEMV and the DoRA norms. opcheck compares each fake implementation's outputs with the real
ones and checks the op's registration; a given ||W||² comes back as a copy, since an op's output cannot alias its
input (eager calls may return it as is)."""
import pytest
import torch

from peft_fast.kernels import dora_norm_triton, nf4_quantize_reference
from peft_fast.kernels.common.nf4_format import absmax_f32, launch_args


def _nf4(device, nested):
    packed, state = nf4_quantize_reference(torch.randn(24, 128, device=device), 64, compress_statistics=nested)
    return launch_args(packed, state, device), state


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_ops_pass_opcheck(device, nested, dtype):
    (flat, absmax, code, n), state = _nf4(device, nested)
    nabs, ncode, offset, nbs = n if n is not None else (None, None, None, 1)
    ops = torch.ops.peft_fast
    torch.library.opcheck(ops.nf4_dequantize_raw.default,
                          (flat, absmax, code, nabs, ncode, offset, nbs, [24, 128], dtype, 64))
    x = torch.randn(3, 128, device=device, dtype=dtype)
    for bias in (None, torch.randn(24, device=device, dtype=dtype)):
        torch.library.opcheck(ops.nf4_gemv_raw.default, (x, flat, absmax, code, nabs, ncode, offset, nbs, 24, 64, bias))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_sq", [False, True])
def test_dora_norm_ops_pass_opcheck(device, given_sq, dtype):
    w, a, b = (torch.randn(*s, device=device, dtype=dtype) for s in ((24, 128), (4, 128), (24, 4)))
    sq = (w.float() * w.float()).sum(1).to(torch.float64 if dtype == torch.float64 else torch.float32)
    sq = sq if given_sq else None
    ops = torch.ops.peft_fast
    torch.library.opcheck(ops.dora_norm.default, (w, a, b, 0.7, sq))
    norm, sq_out = ops.dora_norm(w, a, b, 0.7, sq)
    if given_sq:
        assert sq_out.data_ptr() != sq.data_ptr() and torch.equal(sq_out, sq)
        assert dora_norm_triton(w, a, b, 0.7, sq)[1] is sq  # eager returns the given ||W||² itself
    (flat, _, code, _), state = _nf4(device, True)
    args = (flat, absmax_f32(state).contiguous(), code, a, b, 0.7, sq, 24, 128, 64, 0)
    torch.library.opcheck(ops.dora_norm_nf4.default, args)
