"""The Triton ops read their operands by the sizes they are given: factors that do not fit x, each other or the
base are refused with a clear message (the references fail in torch's matmul), inputs are never written unless
the caller hands them over, and batch metadata takes plain Python lists."""
import pytest
import torch

import peft_fast.kernels as K

pytestmark = pytest.mark.triton


def _x(device):
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 8, generator=g).to(device), torch.randn(5, 8, generator=g).to(device)


@pytest.mark.parametrize("a_shape, b_shape", [((2, 10), (5, 2)), ((2, 8), (5, 3)), ((2, 8), (7, 2))])
def test_mismatched_factors_are_refused(device, a_shape, b_shape):
    x, w = _x(device)
    a, b = torch.randn(a_shape, device=device), torch.randn(b_shape, device=device)
    with pytest.raises(RuntimeError):  # torch's own matmul error
        K.lora_linear_reference(x, w, None, a, b, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        K.lora_linear_triton(x, w, None, a, b, 1.0)
    packed, state = K.nf4_quantize_reference(torch.randn(5, 8), 64)
    with pytest.raises(ValueError, match="do not fit"):
        K.qlora_linear_triton(x, packed.to(device), state.to(device), None, a, b, 1.0)
    c = torch.rand(5, device=device) + 0.5
    if b_shape[0] == 5:  # (dora's own check names B's outputs against the weight)
        with pytest.raises(ValueError, match="fit"):
            K.dora_linear_triton(None, x, None, a, b, 1.0, c, weight=w)
        with pytest.raises(ValueError, match="fit"):
            K.dora_dropout_linear_triton(x, w, None, a, b, 1.0, c, 0.1)
    with pytest.raises(ValueError, match="lora_bias"):
        K.lora_linear_triton(x, w, None, torch.randn(2, 8, device=device), torch.randn(5, 2, device=device), 1.0,
                             lora_bias=torch.randn(4, device=device))


def test_dora_linear_leaves_the_callers_base_alone(device):
    x, w = _x(device)
    a, b, c = torch.randn(2, 8, device=device), torch.randn(5, 2, device=device), torch.rand(5, device=device) + .5
    base = x @ w.T
    kept = base.clone()
    with torch.no_grad():
        y = K.dora_linear(base, x, None, a, b, 1.0, c)
    assert torch.equal(base, kept) and y.data_ptr() != base.data_ptr()
    torch.testing.assert_close(y, K.dora_linear_reference(kept, x, None, a, b, 1.0, c))


def test_batch_meta_from_python_lists():
    assert K.make_lora_batch_meta([], 2) is not None
    assert K.make_lora_batch_meta([1, -1, 0], 2) is not None
