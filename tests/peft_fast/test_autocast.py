"""torch.autocast over float32 models, every tuner, against PEFT: a forward under autocast leaves no 16-bit values
in the eval caches (DoRA's norms, LoHa/LoKr's ΔW, OFT's folded weight), so the float32 forwards after it give what
they gave before; and each layer returns the dtype PEFT's returns under autocast (x's for LoHa, LoKr, OFT and VeRA,
which end with PEFT's cast back), with and without gradients, in train and eval."""
import copy
import warnings

import pytest
import torch
from torch import nn

from tiny_models import base_model, copy_weights, impl, inputs, perturb_magnitudes, ref

T = ["q_proj", "v_proj", "down_proj"]
CASES = {
    "lora": ("LoraConfig", dict(target_modules=T, r=4, init_lora_weights=False)),
    "dora": ("LoraConfig", dict(target_modules=T, r=4, init_lora_weights=False, use_dora=True)),
    "dora-embedding": ("LoraConfig", dict(target_modules=["embed_tokens"], r=4, init_lora_weights=False,
                                          use_dora=True)),
    "ia3": ("IA3Config", dict(target_modules=T, feedforward_modules=["down_proj"], init_ia3_weights=False)),
    "loha": ("LoHaConfig", dict(target_modules=T, r=4, init_weights=False)),
    "lokr": ("LoKrConfig", dict(target_modules=T, r=4, init_weights=False)),
    "vera": ("VeraConfig", dict(target_modules=["q_proj", "v_proj"], r=8, init_weights=False)),
    "oft": ("OFTConfig", dict(target_modules=T, r=0, oft_block_size=8, init_weights=False)),
    "adalora": ("AdaLoraConfig", dict(target_modules=T, init_r=4, target_r=2, total_step=10,
                                      init_lora_weights=False)),
}
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _pair(case, base):
    cls, kw = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        r = ref.get_peft_model(copy.deepcopy(base), getattr(ref, cls)(**copy.deepcopy(kw)))
        i = impl.get_peft_model(copy.deepcopy(base), getattr(impl, cls)(**copy.deepcopy(kw)))
    copy_weights(r, i)
    if "dora" in case:
        perturb_magnitudes(r, i)
    return r, i


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_forward_under_autocast_leaves_float32_forwards_unchanged(case):
    _, model = _pair(case, base_model("llama"))
    model.eval()
    x = inputs("llama")
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        with torch.autocast(**BF16):  # the first forward: it fills the caches
            model(**x)
        after = model(**x).logits
        want = fresh(**x).logits
    torch.testing.assert_close(after, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", sorted(set(CASES) - {"dora-embedding"}))
def test_each_layer_returns_peft_s_dtype_under_autocast(case, grad, training):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64))
    kw = dict(CASES[case][1], target_modules=["0"])
    if "feedforward_modules" in kw:
        kw["feedforward_modules"] = ["0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ref.get_peft_model(copy.deepcopy(base), getattr(ref, CASES[case][0])(**copy.deepcopy(kw)))
        i = impl.get_peft_model(copy.deepcopy(base), getattr(impl, CASES[case][0])(**copy.deepcopy(kw)))
    copy_weights(r, i)
    x = torch.randn(3, 64)
    got = {}
    for lib, model in (("ref", r), ("impl", i)):
        model.train(training)
        with torch.set_grad_enabled(grad), torch.autocast(**BF16):
            got[lib] = model(x)
    assert got["impl"].dtype == got["ref"].dtype
    torch.testing.assert_close(got["impl"].float(), got["ref"].float(), atol=0.1, rtol=0.05)


def test_vera_runs_on_meta_tensors_without_gradients():
    """Autocast is asked about the input's device, which autocast may not know (meta): that means off."""
    for lib in (ref, impl):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(nn.Sequential(nn.Linear(64, 64)), lib.VeraConfig(target_modules=["0"], r=8))
        model = model.eval().to("meta")
        with torch.no_grad():
            assert model(torch.randn(2, 64, device="meta")).shape == (2, 64), lib.__name__
