"""get_base_model_state_dict / set_base_model_state_dict against PEFT 0.21.2: the base model's tensors under the
original model's keys (no wrapper infixes, no adapter tensors) on LoRA, DoRA, modules_to_save, trainable tokens,
target_parameters and a GPT-2 (Conv1D) model; loading them back, and refusals that leave the model as it was."""
import warnings

import pytest
import torch

from tiny_models import base_model, default_cfg, impl, inputs, out, peft_fast_only, ref

CASES = {
    "lora": ("llama", {}),
    "dora-save-head": ("llama", {"use_dora": True, "modules_to_save": ["lm_head"]}),
    "tokens": ("llama", {"trainable_token_indices": {"embed_tokens": [1, 5]}}),
    "gpt2": ("gpt2", {}),
}


def _both(kind, **cfg):
    models = []
    for lib in (ref, impl):
        base = base_model(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            models.append(lib.get_peft_model(base, lib.LoraConfig(**default_cfg(kind, **cfg))))
    return models


@pytest.mark.parametrize("case", list(CASES))
def test_base_state_dict_has_the_original_keys_as_peft(case):
    kind, cfg = CASES[case]
    r, i = _both(kind, **cfg)
    want, got = ref.get_base_model_state_dict(r), impl.get_base_model_state_dict(i)
    assert list(got) == list(want)
    original = base_model(kind).state_dict()
    assert set(got) == set(original)
    for k in got:
        assert torch.equal(got[k], original[k]), k


@pytest.mark.parametrize("case", list(CASES))
def test_setting_the_base_state_dict_as_peft(case):
    kind, cfg = CASES[case]
    r, i = _both(kind, **cfg)
    other, g = base_model(kind), torch.Generator().manual_seed(3)
    with torch.no_grad():  # (through the parameters: tied ones, GPT-2's wte and lm_head, stay one tensor)
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    new = other.state_dict()
    results = [lib.set_base_model_state_dict(m, new) for lib, m in ((ref, r), (impl, i))]
    assert tuple(results[1]) == tuple(results[0]) == ([], [])
    for k, v in impl.get_base_model_state_dict(i).items():
        assert torch.equal(v, new[k]), k
    x = inputs(kind)
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(out(i, x), out(r, x), atol=1e-4, rtol=1e-4)


def test_strict_refusal_leaves_the_model_and_lenient_load_reports_as_peft():
    r, i = _both("llama")
    sd = base_model("llama").state_dict()
    bad = {k: v * 2 for k, v in sd.items() if "q_proj" not in k}
    bad["no.such.key"] = torch.zeros(1)
    before = {k: v.clone() for k, v in i.state_dict().items()}
    for lib, m in ((ref, r), (impl, i)):
        with pytest.raises(RuntimeError, match="Missing key.*q_proj(.|\\n)*Unexpected key.*no.such.key"):
            lib.set_base_model_state_dict(m, bad)
    assert all(torch.equal(v, before[k]) for k, v in i.state_dict().items())
    results = [lib.set_base_model_state_dict(m, bad, strict=False) for lib, m in ((ref, r), (impl, i))]
    assert sorted(results[1].missing_keys) == sorted(results[0].missing_keys)
    assert results[1].unexpected_keys == results[0].unexpected_keys == ["no.such.key"]
    emb = "model.embed_tokens.weight"
    assert torch.equal(impl.get_base_model_state_dict(i)[emb], sd[emb] * 2)


def test_4bit_base_keeps_its_quantization_state_keys_as_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    from qlora_models import CASES as Q, TARGETS, load4, save_tiny_llama

    path = save_tiny_llama(tmp_path)
    got = {}
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = lib.get_peft_model(load4(path, Q[0]), lib.LoraConfig(r=2, target_modules=list(TARGETS)))
        got[lib.__name__] = lib.get_base_model_state_dict(m)
    want = got["peft"]
    assert list(got[impl.__name__]) == list(want)
    assert any(k.endswith("q_proj.weight.absmax") for k in want)
    for k in want:
        assert torch.equal(got[impl.__name__][k], want[k]), k


def test_parameter_targets_as_peft():
    from moe_models import moe_pair

    _, r, i = moe_pair("mixtral", "experts+attention")
    want, got = ref.get_base_model_state_dict(r), impl.get_base_model_state_dict(i)
    assert list(got) == list(want) and any("experts" in k for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@peft_fast_only
@pytest.mark.parametrize("patched", [False, True], ids=["peft", "patched-peft"])
def test_a_peft_model_gets_peft_s_own_answer(patched):
    """peft_fast's functions over Hugging Face PEFT's model (as peft_fast.patch leaves it, or plain): PEFT's
    result, not its layers walked as plain modules."""
    import peft_fast

    models = []
    for _ in range(2):
        base = base_model("llama")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            models.append(ref.get_peft_model(base, ref.LoraConfig(**default_cfg("llama"))))
    mine, theirs = models
    if patched:
        peft_fast.patch(mine)
    got, want = peft_fast.get_base_model_state_dict(mine), ref.get_base_model_state_dict(theirs)
    assert list(got) == list(want) and not any("lora_" in k or "base_layer" in k for k in got)
    doubled = {k: v * 2 for k, v in want.items()}
    assert tuple(peft_fast.set_base_model_state_dict(mine, doubled)) == ([], [])
    assert all(torch.equal(v, doubled[k]) for k, v in peft_fast.get_base_model_state_dict(mine).items())
