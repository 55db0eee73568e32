"""DoRA over bitsandbytes 4-bit bases (a transformers tiny Llama loaded in 4-bit on CPU) against PEFT's
`lora.bnb.Linear4bit` with use_dora=True: logits, gradients of A, B and the magnitude, merges, files.

PEFT is run in train mode (dropout 0, so the same function) wherever it would otherwise run eval without gradients:
there bitsandbytes repacks a CPU weight for its AVX512-BF16 kernel, and PEFT's DoRA then dequantizes the repacked
bytes as if they were bnb's plain layout (`dequantize_module_weight`), a wrong weight norm (a PEFT bug on such
CPUs). peft_fast reads the repacked weight through bnb's own inverse and stays correct.
"""
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from tiny_models import AGAINST_PEFT, assert_close, count_calls, impl, perturb_magnitudes, ref  # noqa: E402
from qlora_models import CASES, IDS, ids, load4, lora_kw, make_qlora_pair, save_tiny_llama  # noqa: E402
from switches import use_settings

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's DoRA against PEFT's")


def make_pair(path, case, **over):
    ref_model, impl_model = make_qlora_pair(path, case, **over)
    if over.get("use_dora"):
        assert perturb_magnitudes(ref_model, impl_model) > 0  # else m / norm = 1: DoRA's scale goes untested
    return ref_model, impl_model


def tol(case):
    # by the compute dtype (case[1]): bf16 matmuls round by the order of their sums, which differs between torch
    # releases (2.11 against 2.13 here)
    return {"atol": 1e-5, "rtol": 1e-5} if case[1] == torch.float32 else {"atol": 1e-5, "rtol": 8e-3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_dora"))


@pytest.fixture
def norm_calls(monkeypatch):
    import peft_fast.tuners.lora.dora as dora_mod

    return count_calls(monkeypatch, dora_mod, "dora_norm_nf4")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_logits_and_grads(model_dir, case, dropout, norm_calls):
    ref_model, impl_model = make_pair(model_dir, case, use_dora=True, lora_dropout=dropout)
    ref_model.train()
    impl_model.train()
    x = ids()
    torch.manual_seed(4)
    ref_out = ref_model(input_ids=x, labels=x)
    torch.manual_seed(4)
    impl_out = impl_model(input_ids=x, labels=x)
    assert norm_calls  # the norm came from the packed 4-bit weight
    assert_close(impl_out.logits, ref_out.logits, **tol(case))
    ref_out.loss.backward()
    impl_out.loss.backward()
    rg = {n: p.grad for n, p in ref_model.named_parameters() if p.requires_grad}
    ig = {n: p.grad for n, p in impl_model.named_parameters() if p.requires_grad}
    assert set(rg) == set(ig) and any("lora_magnitude_vector" in n for n in rg)
    for n in rg:
        assert ig[n] is not None and ig[n].abs().sum() > 0, n
        assert_close(ig[n], rg[n], atol=1e-5, rtol=1e-3 if case[0] == torch.float32 else 2e-2, msg=n)


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_eval_logits(model_dir, case):
    ref_model, impl_model = make_pair(model_dir, case, use_dora=True)
    _eval_without_repack(ref_model)  # see the module docstring
    _eval_without_repack(impl_model)
    x = ids(seed=2)
    with torch.no_grad():
        expected = ref_model(input_ids=x).logits
        with ref_model.disable_adapter():
            assert not torch.allclose(ref_model(input_ids=x).logits, expected, atol=1e-4)
        assert_close(impl_model(input_ids=x).logits, expected, **tol(case))
        assert_close(impl_model(input_ids=x).logits, expected, **tol(case))  # cached scale
    assert_close(impl_model(input_ids=x).logits, expected, **tol(case))  # with autograd on


def _eval_without_repack(model):
    """Eval mode for the adapters (DoRA's cached scale), while the bnb base layers stay in train mode, where bnb
    computes from its plain layout and does not repack."""
    model.eval()
    for m in model.modules():
        if type(m).__module__.startswith("bitsandbytes"):
            m.train()


def _dequantized(model):
    from peft_fast.bases import view_of

    return {n: view_of(m.base_layer).read_weight() for n, m in model.named_modules()
            if hasattr(m, "lora_magnitude_vector") and type(m.base_layer).__name__ == "Linear4bit"}


def test_merge_and_unmerge_match_peft(model_dir):
    case = CASES[0]
    ref_model, impl_model = make_pair(model_dir, case, use_dora=True)
    ref_model.eval()
    impl_model.eval()
    before = _dequantized(impl_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model.merge_adapter()
        impl_model.merge_adapter()
    rw, iw = _dequantized(ref_model), _dequantized(impl_model)
    assert rw.keys() == iw.keys() and rw
    for n in rw:
        assert not torch.allclose(iw[n], before[n], atol=1e-4), n
        assert_close(iw[n], rw[n], atol=1e-5, rtol=1e-4, msg=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model.unmerge_adapter()
        impl_model.unmerge_adapter()
    rw, iw = _dequantized(ref_model), _dequantized(impl_model)
    for n in rw:
        assert_close(iw[n], rw[n], atol=1e-5, rtol=1e-4, msg=n)


def test_merge_and_unload_dequantized_is_exact(model_dir):
    """merge_and_unload(dequantize=True): plain Linear layers holding PEFT's exact (not re-quantized) DoRA merge."""
    ref_model, impl_model = make_pair(model_dir, CASES[0], use_dora=True)
    _eval_without_repack(impl_model)
    x = ids(seed=5)
    with torch.no_grad():
        expected = impl_model(input_ids=x).logits
    merged = impl_model.merge_and_unload(dequantize=True)
    with torch.no_grad():
        assert_close(merged(input_ids=x).logits, expected, atol=2e-5, rtol=2e-5)


def test_saved_adapters_load_across(model_dir, tmp_path):
    case = CASES[0]
    ref_model, impl_model = make_pair(model_dir, case, use_dora=True)
    with torch.no_grad():
        for n, p in ref_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.3)
    impl_model.save_pretrained(tmp_path / "impl")
    ref_model.save_pretrained(tmp_path / "ref")
    x = ids(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_loaded = ref.PeftModel.from_pretrained(load4(model_dir, case), tmp_path / "impl")
        impl_loaded = impl.PeftModel.from_pretrained(load4(model_dir, case), tmp_path / "ref")
    for m in (ref_model, impl_model, ref_loaded, impl_loaded):
        m.train()  # dropout is 0; see the module docstring
    with torch.no_grad():
        assert_close(ref_loaded(input_ids=x).logits, impl_model(input_ids=x).logits, **tol(case))
        assert_close(impl_loaded(input_ids=x).logits, ref_model(input_ids=x).logits, **tol(case))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_triton_backend(model_dir, monkeypatch, dropout):
    from peft_fast.kernels import interpreting

    if not (interpreting() or torch.cuda.is_available()):
        pytest.skip("no Triton device")
    ref_model, impl_model = make_pair(model_dir, CASES[0], use_dora=True, target_modules="all-linear",
                                      lora_dropout=dropout)
    use_settings(monkeypatch, backend="triton")
    ref_model.train()
    impl_model.train()
    x = ids(batch=2, seq=4)
    torch.manual_seed(9)
    ref_out = ref_model(input_ids=x, labels=x)
    torch.manual_seed(9)
    impl_out = impl_model(input_ids=x, labels=x)
    assert_close(impl_out.logits, ref_out.logits, atol=1e-4, rtol=1e-4)
    ref_out.loss.backward()
    impl_out.loss.backward()
    r_p = dict(ref_model.named_parameters())
    for n, p in impl_model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, r_p[n].grad, atol=1e-4, rtol=1e-3, msg=n)
    if dropout == 0:
        impl_model.eval()
        with torch.no_grad():
            assert_close(impl_model(input_ids=x).logits, ref_out.logits.detach(), atol=1e-4, rtol=1e-4)


def test_eval_over_bnb_cpu_repacked_weight(model_dir):
    """Eval without gradients lets bnb repack its CPU weight (AVX512-BF16 layout, where the CPU has it); the DoRA
    norm must still come from the right weight. PEFT misreads it (module docstring), so the reference is PEFT in
    train mode; bnb's repacked kernel computes the base in bf16, hence the looser tolerance."""
    ref_model, impl_model = make_pair(model_dir, CASES[0], use_dora=True)
    ref_model.train()
    impl_model.eval()
    x = ids(seed=6)
    with torch.no_grad():
        expected = ref_model(input_ids=x).logits
        got = impl_model(input_ids=x).logits
        with ref_model.disable_adapter():
            base = ref_model(input_ids=x).logits
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 5e-3, rel
    assert ((base - expected).norm() / expected.norm()).item() > 20 * rel  # a wrong norm would show


@pytest.mark.parametrize("backend", ["auto", "triton"])  # triton on a CPU: the interpreter
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_dora_on_peft_fast_nf4linear_matches_peft_over_bitsandbytes(model_dir, case, backend, monkeypatch):
    """peft_fast.quantize's NF4Linear holds bitsandbytes' bytes: DoRA over it equals PEFT's DoRA over bnb."""
    from transformers import LlamaForCausalLM

    from peft_fast import NF4Linear, quantize

    use_settings(monkeypatch, backend=backend)
    dtype, compute, double, qt = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_model = load4(model_dir, case)
        ours = quantize(LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype), quant_type=qt, double_quant=double,
                        compute_dtype=compute)
        torch.manual_seed(0)  # the same A, B draws: the magnitudes then come from the bytes alone
        ref_model = ref.get_peft_model(bnb_model, ref.LoraConfig(**lora_kw(use_dora=True)))
        torch.manual_seed(0)
        impl_model = impl.get_peft_model(ours, impl.LoraConfig(**lora_kw(use_dora=True)))
    assert isinstance(impl_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    r_p = dict(ref_model.named_parameters())
    with torch.no_grad():
        for n, p in impl_model.named_parameters():
            # Initialised from the same bytes and draws: the same magnitudes. (bf16: peft_fast's NF4Linear keeps the
            # initial A, B in float32 where PEFT over bnb rounds them through bf16, for LoRA too, so not compared.)
            if "lora_magnitude_vector" in n and dtype == torch.float32:
                assert_close(p, r_p[n], atol=1e-6, rtol=1e-5, msg=n)
            if "lora_" in n:
                p.copy_(r_p[n])
    assert perturb_magnitudes(ref_model, impl_model) > 0
    ref_model.train()
    impl_model.train()
    x = ids(batch=2, seq=5)
    ref_out = ref_model(input_ids=x, labels=x)
    impl_out = impl_model(input_ids=x, labels=x)
    loose = backend == "triton" and dtype == torch.bfloat16  # 16-bit tensor-core policy of the Triton path
    assert_close(impl_out.logits, ref_out.logits, **({"atol": 3e-2, "rtol": 3e-2} if loose else tol(case)))
    ref_out.loss.backward()
    impl_out.loss.backward()
    for n, p in impl_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            rtol = 1e-3 if dtype == torch.float32 else 5e-2
            assert_close(p.grad.float(), r_p[n].grad.float(), atol=1e-4 if not loose else 1e-2, rtol=rtol, msg=n)
