"""`peft_fast.helpers`: PEFT's helpers for peft_fast models, against `peft.helpers` on PEFT's models."""
import warnings

import pytest
import torch

import peft.helpers as ref_helpers
from tiny_models import AGAINST_PEFT, assert_close, inputs, make_pair, out, perturb_magnitudes

if AGAINST_PEFT:
    import peft.helpers as helpers
else:
    import peft_fast.helpers as helpers


@pytest.mark.parametrize("dora", [False, True])
def test_rescale_adapter_scale_matches_peft(dora):
    _, ref_model, impl_model = make_pair("llama", use_dora=dora)
    if dora:
        perturb_magnitudes(ref_model, impl_model)
    ref_model.eval(), impl_model.eval()
    x = inputs("llama")
    with torch.no_grad():
        before = out(impl_model, x)  # eval caches (DoRA's norm, launch plans) filled at scale 1
        with ref_helpers.rescale_adapter_scale(ref_model, 0.5):
            want = out(ref_model, x)
        with helpers.rescale_adapter_scale(impl_model, 0.5):
            got = out(impl_model, x)
            mixed = None if AGAINST_PEFT and dora else out(impl_model, x, adapter_names=["default", "__base__",
                                                                                          "default"])
        assert_close(got, want)
        assert (got - before).abs().max() > 1e-4  # the multiplier changed the outputs
        assert_close(out(impl_model, x), before)  # restored
        if mixed is not None:  # PEFT refuses mixed batches with DoRA
            assert_close(mixed[0], want[0])
            assert_close(mixed[2], want[2])
            assert_close(out(impl_model, x, adapter_names=["default"] * 3), before)


def test_rescale_restores_after_an_error_and_checks_its_input():
    _, _, impl_model = make_pair("llama")
    x = inputs("llama")
    with torch.no_grad():
        before = out(impl_model, x)
        with pytest.raises(RuntimeError, match="inside"):
            with helpers.rescale_adapter_scale(impl_model, 0.0):
                raise RuntimeError("inside")
        assert_close(out(impl_model, x), before)
    with pytest.raises(TypeError, match="multiplier"):
        with helpers.rescale_adapter_scale(impl_model, "0.5"):
            pass
    with pytest.raises(ValueError, match="LoraLayer"):
        with helpers.rescale_adapter_scale(torch.nn.Linear(2, 2), 0.5):
            pass


def test_check_if_peft_model_and_signatures(tmp_path):
    _, _, impl_model = make_pair("llama")
    impl_model.save_pretrained(tmp_path / "adapter")
    assert helpers.check_if_peft_model(str(tmp_path / "adapter"))
    assert not helpers.check_if_peft_model(str(tmp_path / "missing"))
    helpers.update_signature(impl_model)
    assert "input_ids" in __import__("inspect").signature(impl_model.forward).parameters
    with pytest.raises(ValueError, match="not supported"):
        helpers.update_signature(impl_model, "backward")


@pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast.patch has no PEFT counterpart")
def test_rescale_on_a_patched_peft_model():
    import peft_fast

    _, ref_model, _ = make_pair("llama")
    x = inputs("llama")
    with torch.no_grad():
        with ref_helpers.rescale_adapter_scale(ref_model, 0.5):
            want = out(ref_model, x)
        peft_fast.patch(ref_model)
        with helpers.rescale_adapter_scale(ref_model, 0.5):
            assert_close(out(ref_model, x), want)


@pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast.patch has no PEFT counterpart")
def test_rescale_on_a_patched_peft_model_with_layers_left_to_peft():
    """peft_fast.patch leaves PEFT's lora.Embedding to PEFT: the helper rescales it too, as PEFT's does."""
    import peft_fast

    _, ref_model, _ = make_pair("llama", target_modules=["embed_tokens", "q_proj"])
    x = inputs("llama")
    with torch.no_grad():
        with ref_helpers.rescale_adapter_scale(ref_model, 0.5):
            want = out(ref_model, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_fast.patch(ref_model)
        with helpers.rescale_adapter_scale(ref_model, 0.5):
            assert_close(out(ref_model, x), want)
