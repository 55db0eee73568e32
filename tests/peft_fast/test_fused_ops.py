"""The fused decoder's operations (peft_fast/fused/ops.py, loss.py) against their definitions: transformers' own
modules and loss, in float64 on random inputs, forward and backward; each backend's functions likewise (Liger's
RoPE and loss run under the Triton interpreter on CPUs; its RMSNorm and SwiGLU do not, so they run on GPUs only)."""
import pytest
import torch
from tiny_models import peft_fast_only

from peft_fast.fused import loss as loss_ops
from peft_fast.fused import ops

pytestmark = peft_fast_only
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _loss_inputs(n_batch=3, seq=45, hidden=24, vocab=173, dtype=torch.float64, head_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_batch, seq, hidden, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) / hidden ** 0.5).to(DEVICE).requires_grad_(head_grad)
    labels = torch.randint(0, vocab, (n_batch, seq), generator=g).to(DEVICE)
    labels[0, :7] = -100
    labels[2, 30:] = -100
    return h, w, labels


def _check_loss(fn, kw, dtype=torch.float64, atol=1e-10, rtol=1e-9, head_grad=True):
    h, w, labels = _loss_inputs(dtype=dtype, head_grad=head_grad)
    want = loss_ops.causal_lm_loss_reference(h, w, labels, **kw)
    want_grads = torch.autograd.grad(want, [t for t in (h, w) if t.requires_grad])
    got = fn(h, w, labels, **kw)
    got_grads = torch.autograd.grad(got, [t for t in (h, w) if t.requires_grad])
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


LOSS_CASES = [{}, {"num_items_in_batch": torch.tensor(57)}, {"num_items_in_batch": 80}, {"softcap": 2.5},
              {"ignore_index": 5, "shift_labels": None}, {"shift_labels": "rolled"}]


def _case(kw):
    kw = dict(kw)
    if kw.get("shift_labels") == "rolled":
        g = torch.Generator().manual_seed(1)
        kw["shift_labels"] = torch.randint(0, 173, (3, 45), generator=g).masked_fill_(
            torch.rand(3, 45, generator=g) < 0.2, -100).to(DEVICE)
    return kw


@pytest.mark.parametrize("kw", LOSS_CASES, ids=lambda kw: ",".join(kw) or "mean")
@pytest.mark.parametrize("head_grad", [True, False])
def test_chunked_loss_matches_transformers_loss_in_float64(kw, head_grad, monkeypatch):
    monkeypatch.setattr(loss_ops, "_MIN_CHUNK", 8)  # several chunks, the last one short
    kw = _case(kw)
    if kw.get("ignore_index") == 5:  # labels hold no -100 when another index is the ignored one
        h, w, labels = _loss_inputs()
        labels = labels.clamp_min(0)
        want = loss_ops.causal_lm_loss_reference(h, w, labels, **kw)
        torch.testing.assert_close(loss_ops.causal_lm_loss(h, w, labels, **kw), want, atol=1e-10, rtol=1e-9)
        return
    _check_loss(loss_ops.causal_lm_loss, kw, head_grad=head_grad)


def test_chunk_rows_keep_a_chunks_logits_near_the_hidden_states_size():
    assert loss_ops._chunk_rows(4096, 32000, 2048) == 256  # 16 chunks of 256 x 32000 float32 logits
    assert loss_ops._chunk_rows(10, 32000, 2048) == 10
    assert loss_ops._chunk_rows(4096, 100, 2048) == 4096


def test_loss_without_grad_mode_makes_no_gradients():
    h, w, labels = _loss_inputs()
    with torch.no_grad():
        got = loss_ops.causal_lm_loss(h, w, labels)
    assert not got.requires_grad
    torch.testing.assert_close(got, loss_ops.causal_lm_loss_reference(h.detach(), w.detach(), labels))


def test_all_labels_ignored_gives_a_nan_loss_and_zero_gradients_as_transformers():
    h, w, labels = _loss_inputs()
    labels.fill_(-100)
    got, want = loss_ops.causal_lm_loss(h, w, labels), loss_ops.causal_lm_loss_reference(h, w, labels)
    assert torch.isnan(got) and torch.isnan(want)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(want, [h, w])):
        assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))


@pytest.mark.parametrize("upstream", [3.0, 65536.0])
def test_the_upstream_gradient_scales_both_gradients(upstream):
    """A loss multiplied before backward (a weighted sum of losses, a loss scaler's factor)."""
    h, w, labels = _loss_inputs()
    g_out = torch.tensor(upstream, dtype=torch.float64, device=DEVICE)
    got = torch.autograd.grad(loss_ops.causal_lm_loss(h, w, labels), [h, w], g_out)
    want = torch.autograd.grad(loss_ops.causal_lm_loss_reference(h, w, labels), [h, w], g_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10 * upstream, rtol=1e-9)


def test_float16_gradients_survive_a_loss_scalers_factor():
    """GradScaler starts at 65536: float16 cannot hold that factor, nor the unscaled gradients of many tokens."""
    h, w, labels = _loss_inputs(n_batch=8, seq=256, dtype=torch.float16, head_grad=False)
    g_out = torch.tensor(65536.0, device=DEVICE)
    (got,) = torch.autograd.grad(loss_ops.causal_lm_loss(h, w, labels), [h], g_out)
    h32 = h.detach().float().requires_grad_()
    (want,) = torch.autograd.grad(loss_ops.causal_lm_loss_reference(h32, w.float(), labels), [h32], g_out)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert (got.float() - want).norm() / want.norm() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_backend_loss_matches_within_dtype(dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    _check_loss(ops.compile_ops().causal_lm_loss, {"softcap": 4.0}, dtype=dtype, **tol)


@pytest.mark.parametrize("family,gemma", [("llama", False), ("gemma", True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rms_norm_reference_is_transformers_norm_bit_for_bit(family, gemma, dtype):
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = getattr(module, f"{family.capitalize()}RMSNorm")
    norm = cls(40, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 7, 40, dtype=dtype)
    assert torch.equal(ops.rms_norm_reference(x, norm.weight, 1e-5, gemma), norm(x))


def _backend_ops(backend):
    if backend == "liger":
        pytest.importorskip("liger_kernel")
        return ops.liger_ops()
    return ops.compile_ops()


@pytest.mark.parametrize("backend", ["compile", "liger"])
def test_backend_rope_matches_transformers(backend):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rope = _backend_ops(backend).rope(apply_rotary_pos_emb)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, h, 9, 16, generator=g).to(DEVICE).requires_grad_() for h in (4, 2))
    # Liger reads one half of cos/sin, as the rotary embeddings of these families make them: cat(freqs, freqs).
    angles = torch.randn(2, 9, 8, generator=g).repeat(1, 1, 2).to(DEVICE)
    cos, sin = angles.cos(), angles.sin()
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = rope(q, k, cos, sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dq, dk = torch.autograd.grad(sum(t.pow(2).sum() for t in got), [q, k])
    eq, ek = torch.autograd.grad(sum(t.pow(2).sum() for t in want), [q, k])
    torch.testing.assert_close(dq, eq, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dk, ek, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["compile", "liger"])
@pytest.mark.parametrize("softcap", [None, 6.0])
def test_backend_loss_matches_transformers(backend, softcap):
    if backend == "liger" and softcap and DEVICE == "cpu":
        pytest.skip("Liger-Kernel's soft-capped loss fails under the Triton interpreter: GPU only")
    fn = _backend_ops(backend).causal_lm_loss
    _check_loss(fn, {"num_items_in_batch": torch.tensor(91), "softcap": softcap}, dtype=torch.float32, atol=1e-5,
                rtol=1e-4, head_grad=backend == "compile")


@pytest.mark.parametrize("backend", ["compile", "liger"])
@pytest.mark.parametrize("gemma", [False, True])
def test_backend_norm_and_glu_match_references(backend, gemma):
    if backend == "liger" and DEVICE == "cpu":
        pytest.skip("Liger-Kernel's RMSNorm and SwiGLU fail under the Triton interpreter ('float' object has no "
                    "attribute 'to'): GPU only")
    table = _backend_ops(backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 48, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(48, generator=g).to(DEVICE).requires_grad_()
    got, want = table.per_class(table.rms_norm, "Test")(x, w, 1e-6, gemma), ops.rms_norm_reference(x, w, 1e-6, gemma)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got.sin().sum(), [x, w]), torch.autograd.grad(want.sin().sum(), [x, w])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    act = "gelu_pytorch_tanh" if gemma else "silu"
    ref = ops.gelu_tanh_mul_reference if gemma else ops.silu_mul_reference
    a, b = (torch.randn(2, 5, 40, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    got, want = table.per_class(table.glu[act], "Test")(a, b), ref(a, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for p, q in zip(torch.autograd.grad(got.sum(), [a, b]), torch.autograd.grad(want.sum(), [a, b])):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def test_auto_picks_liger_only_on_cuda():
    assert ops.resolve(True, torch.device("cpu")) == "compile"
    assert ops.resolve("auto", torch.device("cpu")) == "compile"
    assert ops.resolve(None, torch.device("cpu")) is None and ops.resolve(False, torch.device("cpu")) is None
    expected = "liger" if ops.liger_available() else "compile"
    assert ops.resolve("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("kw", LOSS_CASES[:4] + LOSS_CASES[5:], ids=lambda kw: ",".join(kw) or "mean")
def test_chunked_loss_matches_transformers_own_loss_function(kw, monkeypatch):
    """transformers' ForCausalLMLoss itself as the oracle (float32: it upcasts to float32), shifting included."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    monkeypatch.setattr(loss_ops, "_MIN_CHUNK", 8)
    kw = _case(kw)
    softcap = kw.pop("softcap", None)
    h, w, labels = _loss_inputs(dtype=torch.float32)
    logits = h @ w.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    want = ForCausalLMLoss(logits, labels, w.shape[0], **kw)
    got = loss_ops.causal_lm_loss(h, w, labels, softcap=softcap, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(want, [h, w])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
