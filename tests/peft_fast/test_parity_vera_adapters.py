"""VeRA against PEFT 0.21.2: merging and unloading, several adapters sharing the projections (set / disable / delete,
the checks on a later adapter), 4-bit bases (bitsandbytes, and peft_fast's NF4Linear), the fused inference path on
the Triton kernels, and refusals that leave the model as it was."""
import warnings

import pytest
import torch

from ia3_vera_pairs import VeraConfig, add_both, cfg, configs, grads, make_4bit_pair, make_pair
from switches import use_settings
from tiny_models import (
    AGAINST_PEFT, assert_close, assert_same_state, assert_unchanged, base_model, count_calls, impl, inputs, loss_of,
    out, peft_fast_only, raises_like_peft, snapshot,
)

KINDS = ["llama", "gpt2", "mlp"]


def _eval_pair(kind, **kw):
    _, r, i = make_pair("vera", kind, **kw)
    r.eval(), i.eval()
    return r, i


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_as_peft(kind, safe):
    r, i = _eval_pair(kind)
    x = inputs(kind)
    want = out(r, x)
    for m in (r, i):
        m.merge_adapter(safe_merge=safe)
    assert_same_state(r, i, atol=0, rtol=0)  # W += (Λ_b·B_s)·(Λ_d·A_s), the same ops as PEFT's
    assert_close(out(i, x), want)
    for m in (r, i):
        m.unmerge_adapter()
    assert_same_state(r, i, atol=0, rtol=0)
    assert_close(out(i, x), want)


def test_merge_into_bfloat16_as_peft():
    base = base_model("llama").to(torch.bfloat16)
    r, i = _eval_pair("llama", base=base)
    for m in (r, i):
        m.merge_adapter()
    assert_same_state(r, i, atol=0, rtol=0)  # float32 delta added into bf16 in place, one rounding


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_and_unload(kind):
    r, i = _eval_pair(kind)
    x = inputs(kind)
    want = out(r, x)
    merged_r, merged_i = r.merge_and_unload(), i.merge_and_unload()
    assert_same_state(merged_r, merged_i, atol=0, rtol=0)
    assert_close(out(merged_i, x), want)
    _, i = _eval_pair(kind)
    assert_close(out(i.unload(), x), out(base_model(kind).eval(), x))


def test_later_adapters_share_the_projections_and_switch():
    r, i = _eval_pair("llama")
    add_both("vera", r, i, "other", "llama", target_modules=["q_proj", "k_proj"])
    assert_same_state(r, i, atol=0, rtol=0)  # "other" gets the first adapter's projections (values)
    assert torch.equal(i.base_model.vera_A["other"], i.base_model.vera_A["default"])
    x = inputs("llama")
    for m in (r, i):
        m.set_adapter("other")
    assert_close(out(i, x), out(r, x))
    with r.disable_adapter(), i.disable_adapter():
        assert_close(out(i, x), out(base_model("llama").eval(), x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (r, i):
            m.delete_adapter("other")
    assert i.active_adapters == r.active_adapters == ["default"]
    assert_same_state(r, i, atol=0, rtol=0)  # the deleted adapter's projections are gone from every layer too
    assert_close(out(i, x), out(r, x))


def test_load_a_second_adapter_from_files(tmp_path):
    _, r, i = make_pair("vera", "llama", seed=1)
    r.save_pretrained(tmp_path)
    r, i = _eval_pair("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (r, i):
            m.load_adapter(str(tmp_path), adapter_name="loaded")
            m.set_adapter("loaded")
    assert_same_state(r, i, atol=0, rtol=0)  # Λ from the file, projections under base_model.vera_A.loaded
    x = inputs("llama")
    assert_close(out(i, x), out(r, x))


def test_merge_one_of_two_adapters():
    r, i = _eval_pair("llama")
    add_both("vera", r, i, "other", "llama", target_modules=["q_proj", "k_proj"])
    for m in (r, i):
        m.merge_adapter(adapter_names=["other"])
    assert_same_state(r, i, atol=0, rtol=0)


def test_later_adapter_checks_as_peft():
    r, i = _eval_pair("llama", target_modules=["q_proj", "v_proj"])  # projections for 64 inputs
    for kw, words in (({"r": 16}, ["vera_A", "lower rank"]), ({"target_modules": ["down_proj"]}, ["vera_A", "128"]),
                      ({"projection_prng_key": 3}, ["PRNG"]), ({"save_projection": False}, ["saved"])):
        r_cfg, i_cfg = configs("vera", "llama", **kw)
        snap = snapshot(i)
        raises_like_peft(ValueError, words, lambda: i.add_adapter("new", i_cfg), lambda: r.add_adapter("new", r_cfg))
        if not AGAINST_PEFT:  # peft_fast's guarantee; PEFT keeps some of the refused adapter's parts
            assert_unchanged(i, snap)
    _, r, i = make_pair("vera", "mlp", bias="vera_only")
    r_cfg, i_cfg = configs("vera", "mlp", bias="all")
    raises_like_peft(ValueError, ["only 1 adapter with bias"], lambda: i.add_adapter("new", i_cfg),
                     lambda: r.add_adapter("new", r_cfg))


@peft_fast_only
def test_a_lower_rank_later_adapter_is_refused_when_added():
    # Deliberate difference: PEFT adds it, then fails in every forward (Λ_d has r entries, the shared A more rows).
    r, i = _eval_pair("llama")
    r_cfg, i_cfg = configs("vera", "llama", r=4)
    r.add_adapter("small", r_cfg)
    r.set_adapter("small")
    with pytest.raises(RuntimeError):
        out(r, inputs("llama"))
    snap = snapshot(i)
    with pytest.raises(ValueError, match="r=4"):
        i.add_adapter("small", i_cfg)
    assert_unchanged(i, snap)


def test_broken_adapter_refused_by_safe_merge():
    r, i = _eval_pair("mlp")
    for m in (r, i):
        with torch.no_grad():
            m.base_model.model.lin1.vera_lambda_b["default"][0] = float("inf")
    snap = snapshot(i)
    raises_like_peft(ValueError, ["NaN"], lambda: i.merge_adapter(safe_merge=True),
                     lambda: r.merge_adapter(safe_merge=True))
    if not AGAINST_PEFT:  # peft_fast's guarantee: PEFT has merged lin0 by the time lin1 is refused
        assert_unchanged(i, snap)


@peft_fast_only
def test_refused_load_leaves_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, i = make_pair("vera", "llama")
    i.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :32].contiguous()  # from another model
    save_file(tensors, str(path))
    snap = snapshot(i)
    with pytest.raises(ValueError, match="do not fit"):
        i.load_adapter(str(tmp_path), adapter_name="other")
    assert_unchanged(i, snap)


@peft_fast_only
def test_fused_inference_on_the_triton_kernels(monkeypatch):
    from peft_fast import kernels

    if not kernels.HAS_TRITON:
        pytest.skip("Triton is not installed")
    import peft_fast.tuners.vera.compute as compute

    calls = count_calls(monkeypatch, compute, "lora_linear_triton")
    use_settings(monkeypatch, backend="triton")  # CPU tensors run under the Triton interpreter
    r, i = _eval_pair("mlp")
    x = inputs("mlp")
    with torch.no_grad():
        assert_close(out(i, x), out(r, x))
    assert len(calls) == 2  # lin0 and lin1


@peft_fast_only
def test_fused_4bit_inference_on_the_triton_kernels(monkeypatch):
    import peft_fast
    from peft_fast import kernels

    if not kernels.HAS_TRITON:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    i = impl.get_peft_model(peft_fast.quantize(base_model("mlp")), VeraConfig(**cfg("vera", "mlp")))  # NF4Linear
    with torch.no_grad():
        for n, p in i.named_parameters():
            if "vera_lambda_b" in n:
                p.uniform_(0.5, 1.5)
    i.eval()
    x = inputs("mlp")
    want = out(i, x)  # with autograd: base module, then PEFT's adapter loop
    import peft_fast.tuners.vera.compute as compute

    calls = count_calls(monkeypatch, compute, "qlora_linear_triton")
    use_settings(monkeypatch, backend="triton")
    with torch.no_grad():  # qlora_linear with the folded projections, under the Triton interpreter
        assert_close(out(i, x), want, atol=1e-4, rtol=1e-4)
    assert len(calls) == 2



def test_layer_and_model_status_as_peft():
    import dataclasses

    r, i = _eval_pair("llama")
    add_both("vera", r, i, "other", "llama", target_modules=["q_proj", "k_proj"])
    for m in (r, i):
        m.base_model.set_adapter(["default", "other"])
        m.merge_adapter(["other"])

    def fields(status):
        # PEFT reports a layer's devices for every adapter of the shared projection dicts, held by the layer or not
        # (k_proj lists "default" too); peft_fast reports the adapters the layer holds.
        return {k: v for k, v in dataclasses.asdict(status).items() if k != "devices"}

    assert [fields(s) for s in i.get_layer_status()] == [fields(s) for s in r.get_layer_status()]
    assert dataclasses.asdict(i.get_model_status()) == dataclasses.asdict(r.get_model_status())

# --- 4-bit bases --------------------------------------------------------------------------------------------------
bnb = pytest.importorskip("bitsandbytes")
from qlora_models import CASES, IDS, ids, load4, save_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_vera"))


def _tol(case):
    return {"atol": 1e-5, "rtol": 1e-5} if case[0] == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_4bit_forward_and_gradients(model_dir, case):
    r, i = make_4bit_pair("vera", model_dir, case)
    assert_same_state(r, i, atol=0, rtol=0)  # projections rounded through the compute dtype, as PEFT's
    r.train(), i.train()
    x = ids()
    ro, io = r(input_ids=x, labels=x), i(input_ids=x, labels=x)
    assert io.logits.dtype == ro.logits.dtype
    assert_close(io.logits.float(), ro.logits.float(), **_tol(case))
    ro.loss.backward(), io.loss.backward()
    rg, ig = grads(r), grads(i)
    assert set(rg) == set(ig) and rg
    for n in rg:
        assert_close(ig[n].float(), rg[n].float(), **_tol(case), msg=n)


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_4bit_merge_and_unload_requantizes_as_peft(model_dir, case):
    r, i = make_4bit_pair("vera", model_dir, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft_fast reports the re-quantization's rounding
        merged_r, merged_i = r.merge_and_unload(), i.merge_and_unload()
    assert_same_state(merged_r, merged_i, atol=0, rtol=0)  # the same packed bytes


def test_4bit_files_both_ways(model_dir, tmp_path):
    r, i = make_4bit_pair("vera", model_dir, CASES[0])
    i.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(load4(model_dir, CASES[0]), str(tmp_path), is_trainable=True)
    x = ids()
    assert_close(loaded(input_ids=x).logits, r(input_ids=x).logits)


@peft_fast_only
@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_nf4linear_base_equals_peft_over_bitsandbytes(model_dir, case):
    from transformers import LlamaForCausalLM

    import peft_fast

    r, i = make_4bit_pair("vera", model_dir, case)
    dtype, compute, double, qt = case
    ours = peft_fast.quantize(LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype), quant_type=qt,
                              double_quant=double, compute_dtype=compute)
    torch.manual_seed(0)
    nf4 = impl.get_peft_model(ours, VeraConfig(**{k: v for k, v in i.peft_config["default"].to_dict().items()
                                                  if k not in ("peft_type", "peft_version", "auto_mapping")}))
    nf4.load_state_dict({k: v for k, v in i.state_dict().items() if "vera_" in k}, strict=False)
    x = {"input_ids": ids()}
    assert_close(loss_of(nf4, x), loss_of(r, x), **_tol(case))
    nf4.eval(), r.eval()
    with torch.no_grad():  # the fused 4-bit op with folded projections
        assert_close(loss_of(nf4, x), loss_of(r, x), **_tol(case))
