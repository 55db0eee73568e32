"""kernels/nf4.py: quantize / dequantize against bitsandbytes on CPU, exactly; the Triton dequantize against the
reference."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from peft_fast.kernels import (  # noqa: E402
    NF4State,
    interpreting,
    nf4_dequantize,
    nf4_dequantize_reference,
    nf4_dequantize_triton,
    nf4_from_bnb,
    nf4_quantize,
    nf4_quantize_reference,
    nf4_state_from_bnb,
)
from peft_fast.kernels.common.nf4_format import DYNAMIC_CODE, FP4_CODE, NF4_CODE  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(7, 128), (1, 256), (33, 512), (5, 4096), (4, 3, 256)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05 + 0.002
    w = torch.where(w == 0, torch.full_like(w, 1e-3), w)  # never zeros: a zero has two nearest FP4 codes
    return w.to(dtype)


def _bnb(w, blocksize, nested, quant_type="nf4"):
    return BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def _assert_same_state(state: NF4State, qs):
    assert torch.equal(state.absmax, qs.absmax) and state.absmax.dtype == qs.absmax.dtype
    assert state.shape == qs.shape and state.dtype == qs.dtype and state.blocksize == qs.blocksize
    assert state.quant_type == qs.quant_type and torch.equal(state.code, qs.code)
    assert state.nested == qs.nested
    if qs.nested:
        assert torch.equal(state.offset, qs.offset)
        assert torch.equal(state.nested_absmax, qs.state2.absmax)
        assert state.nested_blocksize == qs.state2.blocksize


def test_codebooks_match_bnb():
    assert torch.equal(NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, BF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, BF.create_dynamic_map())


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bnb_exactly(shape, dtype, blocksize, nested):
    w = _weight(shape, dtype, seed=hash((shape, blocksize)) % 1000)
    packed, state = nf4_quantize(w, blocksize=blocksize, compress_statistics=nested)
    bp, bqs = _bnb(w, blocksize, nested)
    assert packed.dtype == torch.uint8 and packed.shape == bp.shape and torch.equal(packed, bp)
    _assert_same_state(state, bqs)
    got = nf4_dequantize(packed, state)
    want = BF.dequantize_4bit(bp, bqs, quant_type="nf4")
    assert got.dtype == dtype and got.shape == w.shape and torch.equal(got, want)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [32, 256, 512, 1024, 2048, 4096])
def test_other_blocksizes_match_bnb(blocksize, nested):
    for dtype in DTYPES:
        w = _weight((3, 4096), dtype, seed=blocksize)
        packed, state = nf4_quantize(w, blocksize=blocksize, compress_statistics=nested)
        bp, bqs = _bnb(w, blocksize, nested)
        assert torch.equal(packed, bp)
        _assert_same_state(state, bqs)
        assert torch.equal(nf4_dequantize(packed, state), BF.dequantize_4bit(bp, bqs, quant_type="nf4"))


def test_double_quant_many_blocks_matches_bnb():
    # 300 rows × 1024 / 64 = 4800 absmax values: 19 nested blocks, the last one partial.
    w = _weight((300, 1024), torch.bfloat16, seed=7)
    packed, state = nf4_quantize(w, compress_statistics=True)
    bp, bqs = _bnb(w, 64, True)
    assert torch.equal(packed, bp)
    _assert_same_state(state, bqs)
    assert torch.equal(nf4_dequantize(packed, state), BF.dequantize_4bit(bp, bqs, quant_type="nf4"))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp4_matches_bnb(dtype, nested):
    w = _weight((9, 256), dtype, seed=3)
    packed, state = nf4_quantize(w, compress_statistics=nested, quant_type="fp4")
    bp, bqs = _bnb(w, 64, nested, "fp4")
    assert torch.equal(packed, bp)
    _assert_same_state(state, bqs)
    assert torch.equal(nf4_dequantize(packed, state), BF.dequantize_4bit(bp, bqs, quant_type="fp4"))


def test_high_nibble_is_first_element():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = -1.0, 1.0  # codes 0 and 15
    w[0, 2:] = 0.01
    packed, state = nf4_quantize(w)
    assert packed[0, 0].item() == 0x0F and state.absmax.tolist() == [1.0]


@pytest.mark.triton
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dequantize_equals_reference(device, dtype, nested, quant_type):
    for shape, bs in [((7, 128), 64), ((3, 5, 256), 128), ((1, 2048), 32), ((5, 4096), 4096)]:
        w = _weight(shape, dtype, seed=bs).to(device)
        packed, state = nf4_quantize_reference(w, blocksize=bs, compress_statistics=nested, quant_type=quant_type)
        got = nf4_dequantize_triton(packed, state)
        want = nf4_dequantize_reference(packed, state)
        assert got.dtype == dtype and got.shape == w.shape and torch.equal(got, want)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bnb_linear4bit_converted(dtype, nested):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 24, bias=True, dtype=dtype)
    q = bnb.nn.Linear4bit(128, 24, bias=True, compute_dtype=dtype, compress_statistics=nested, quant_type="nf4",
                          quant_storage=torch.uint8)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # bnb quantizes on the move to a device
    assert q.weight.quant_state is not None and q.weight.quant_state.nested == nested
    packed, state = nf4_from_bnb(q)
    assert packed.data_ptr() == q.weight.data.data_ptr()  # used as it is
    want = BF.dequantize_4bit(q.weight.data, q.weight.quant_state, quant_type="nf4")
    assert torch.equal(nf4_dequantize(packed, state), want)
    assert torch.equal(nf4_dequantize_reference(packed, nf4_from_bnb(q.weight)[1]), want)
    # the same bytes our quantizer makes from the original weight
    p2, _ = nf4_quantize(lin.weight.data, compress_statistics=nested)
    assert torch.equal(p2, packed)


def test_state_from_bnb_quant_state():
    w = _weight((6, 256), torch.float16, seed=11)
    bp, bqs = _bnb(w, 128, True)
    state = nf4_state_from_bnb(bqs)
    _assert_same_state(state, bqs)
    assert torch.equal(nf4_dequantize(bp, state), BF.dequantize_4bit(bp, bqs, quant_type="nf4"))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(4, 100), (3, 45), (5, 7), (1, 33), (130, 96)])
def test_blocks_spanning_rows_match_bnb(shape, quant_type, nested):
    """bitsandbytes flattens the weight, so blocks may span rows and the element count may be odd."""
    w = _weight(shape, torch.float32, seed=sum(shape))
    packed, state = nf4_quantize(w, compress_statistics=nested, quant_type=quant_type)
    bp, bqs = BF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    assert torch.equal(packed, bp)
    _assert_same_state(state, bqs)
    got = nf4_dequantize(packed, state)
    # Not bnb's CPU dequantize_4bit: 0.50.2 gets (130, 96) wrong (errors ~2 on unit-normal weights). Rebuild the
    # values from bnb's own bytes and absmax instead: code[nibble] * absmax[element // 64].
    flat = torch.stack([bp.flatten() >> 4, bp.flatten() & 15], 1).flatten()[:w.numel()].long()
    absmax = BF.dequantize_blockwise(bqs.absmax, bqs.state2) + bqs.offset if nested else bqs.absmax
    want = (bqs.code[flat] * absmax[torch.arange(w.numel()) // 64]).view(shape)
    assert torch.equal(got, want)
    if interpreting():
        assert torch.equal(nf4_dequantize_triton(packed, state), want)


def test_errors():
    w = _weight((4, 128), torch.float32)
    with pytest.raises(ValueError, match="quant_type"):
        nf4_quantize(w, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        nf4_quantize(w, blocksize=48)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        nf4_quantize(w.double())
    packed, state = nf4_quantize(w)
    with pytest.raises(ValueError, match="quant_type"):
        nf4_dequantize(packed, NF4State(state.absmax, state.shape, state.dtype, 64, "af4", state.code))
    with pytest.raises(ValueError, match="bytes"):
        nf4_dequantize(packed[:-1], state)
    with pytest.raises(ValueError, match="absmax"):
        nf4_dequantize(packed, NF4State(state.absmax[:-1], state.shape, state.dtype, 64, "nf4"))
    with pytest.raises(ValueError, match="uint8"):
        nf4_dequantize(packed.to(torch.int8), state)
    with pytest.raises(ValueError, match="quant_state"):
        nf4_from_bnb(torch.nn.Parameter(w))


@pytest.mark.triton
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((37, 128), 64), ((3, 45), 64), ((5, 7), 32), ((130, 96), 128),
                                             ((2, 4096), 4096), ((1, 33), 256)])
def test_triton_quantize_equals_reference(device, quant_type, nested, shape, blocksize):
    """Bit for bit, odd counts and blocks spanning rows included; a zero block and exact midpoints too."""
    from peft_fast.kernels import nf4_quantize_triton
    from peft_fast.kernels.common.nf4_format import NF4_CODE

    for dtype in DTYPES:
        w = _weight(shape, dtype, seed=sum(shape) + blocksize).to(device)
        flat = w.view(-1)
        flat[: min(blocksize, flat.numel())] = 0.0  # an all-zero block
        mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
        k = min(15, flat.numel() - blocksize - 1) if flat.numel() > blocksize + 1 else 0
        if k > 0:  # values exactly on midpoints of the next block (its absmax forced to 1): the lower code wins
            flat[blocksize:blocksize + k] = mids[:k].to(device, dtype)
            flat[blocksize + k] = 1.0
        packed, state = nf4_quantize_triton(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        want, wstate = nf4_quantize_reference(w, blocksize=blocksize, compress_statistics=nested,
                                              quant_type=quant_type)
        assert packed.shape == want.shape and torch.equal(packed, want), (dtype, shape)
        assert torch.equal(state.absmax, wstate.absmax)
