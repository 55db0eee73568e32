"""The tuner seam: a toy adapter type written here in a few lines (its config, its layer math, its merge rule) gets
PEFT's whole model API from the shared bases, without any LoRA file: injection, files both ways, loading by
peft_type, several adapters, set/disable/delete, merge/unmerge/unload, status, and all-or-nothing failures."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from tiny_models import AGAINST_PEFT, TinyMLP, assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's own extension point")

import peft_fast  # noqa: E402
from peft_fast.config import PeftConfig  # noqa: E402
from peft_fast.tuners import registry  # noqa: E402
from peft_fast.tuners.base_layer import TunerLayer  # noqa: E402
from peft_fast.tuners.base_model import TunerModel  # noqa: E402


# --- the toy tuner: y = base(x) ⊙ s, one scale per output channel ------------------------------------------------
@dataclass
class ToyScaleConfig(PeftConfig):
    PEFT_TYPE = "TOY_SCALE"
    init_scale: float = 1.0


class ToyScaleLayer(TunerLayer):
    adapter_layer_names = ("toy_scale",)

    def __init__(self, base_layer, adapter_name, config, autocast_adapter_dtype=True):
        super().__init__(base_layer)
        self.toy_scale = nn.ParameterDict()
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, config)

    def update_layer(self, name, config, autocast_adapter_dtype=True):
        view = self.base_view
        self.toy_scale[name] = nn.Parameter(torch.full((view.out_features,), config.init_scale, device=view.device))
        self.set_adapter(self.active_adapters)

    def make_plan(self, x):
        active = [a for a in self.active_adapters if a in self.toy_scale]
        if self.merged or not active:
            return self.base_layer

        def run(x, *args, **kwargs):
            y = self.base_layer(x, *args, **kwargs)
            for name in active:
                y = y * self.toy_scale[name]
            return y

        return run

    def merge_weight(self, name, weight, ctx, live=False):
        return weight * self.toy_scale[name].detach()[:, None]

    def merge_bias(self, name, bias, live=False):
        return bias.mul_(self.toy_scale[name].detach()) if bias is not None else bias

    def unmerge_weight(self, name, weight, live=False):
        return weight / self.toy_scale[name].detach()[:, None]

    def unmerge_bias(self, name, bias):
        return bias.div_(self.toy_scale[name].detach()) if bias is not None else bias

    @classmethod
    def expected_state(cls, target, config):
        return {"toy_scale": (target.out_features,)}


class ToyScaleModel(TunerModel):
    layer_cls = ToyScaleLayer


# --- the tests ------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def toy_tuner():
    registry.register(registry.TunerSpec("TOY_SCALE", ToyScaleConfig, ToyScaleModel, (ToyScaleLayer,)))
    yield
    registry.unregister("TOY_SCALE")


def _base():
    torch.manual_seed(0)
    return TinyMLP()


def _x():
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(3))


def _toy(scale=1.5, targets=("lin0", "lin1")):
    return ToyScaleConfig(target_modules=list(targets), init_scale=scale)


def _set_scales(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(f"toy_scale.{name}"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _expected(model_fn, scales: dict):
    """The toy's math written out on a plain model: each scaled layer's output times its scale."""
    base = _base()
    hooks = [getattr(base, k).register_forward_hook(lambda m, i, o, s=s: o * s) for k, s in scales.items()]
    out = base(_x())
    for h in hooks:
        h.remove()
    return out


def _scales(model, name="default"):
    return {n.split(".")[2]: p.detach().clone() for n, p in model.named_parameters()
            if n.endswith(f"toy_scale.{name}")}


def test_injection_forward_and_parameters():
    model = peft_fast.get_peft_model(_base(), _toy())
    assert isinstance(model.base_model, ToyScaleModel) and model.peft_type == "TOY_SCALE"
    assert type(model.base_model.model.lin0) is ToyScaleLayer and type(model.base_model.model.lin2) is nn.Linear
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.lin0.toy_scale.default", "base_model.model.lin1.toy_scale.default"]
    _set_scales(model, "default", 1)
    torch.testing.assert_close(model(_x()), _expected(_base, _scales(model)))
    status = model.get_model_status()
    assert status.peft_types == {"default": "TOY_SCALE"} and status.num_adapter_layers == 2


def test_files_both_ways_and_loading_by_peft_type(tmp_path):
    model = peft_fast.get_peft_model(_base(), _toy())
    _set_scales(model, "default", 2)
    model.save_pretrained(tmp_path)
    assert set(peft_fast.get_peft_model_state_dict(model)) == {"base_model.model.lin0.toy_scale",
                                                               "base_model.model.lin1.toy_scale"}
    config = PeftConfig.from_pretrained(str(tmp_path))  # the class its peft_type names
    assert type(config) is ToyScaleConfig and config.target_modules == {"lin0", "lin1"}
    loaded = peft_fast.PeftModel.from_pretrained(_base(), str(tmp_path))
    assert isinstance(loaded.base_model, ToyScaleModel) and not loaded.training
    torch.testing.assert_close(loaded(_x()), model(_x()))


def test_several_adapters_set_disable_delete(tmp_path):
    model = peft_fast.get_peft_model(_base(), _toy())
    _set_scales(model, "default", 4)
    model.add_adapter("other", _toy(targets=["lin1"]))
    _set_scales(model, "other", 5)
    base_out = _base()(_x())
    model.set_adapter("other")
    torch.testing.assert_close(model(_x()), _expected(_base, _scales(model, "other")))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["base_model.model.lin1.toy_scale.other"]
    with model.disable_adapter():
        torch.testing.assert_close(model(_x()), base_out)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and "other" not in model.peft_config
    torch.testing.assert_close(model(_x()), _expected(_base, _scales(model)))
    model.load_adapter(str(tmp_path / "other"), adapter_name="again")
    model.set_adapter("again")
    torch.testing.assert_close(model(_x()), _expected(_base, _scales(model, "again")))


def test_merge_unmerge_unload():
    model = peft_fast.get_peft_model(_base(), _toy())
    _set_scales(model, "default", 6)
    want = model(_x()).detach()
    model.merge_adapter()
    assert model.base_model.model.lin0.merged
    torch.testing.assert_close(model(_x()), want)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.lin0.base_layer.weight, _base().lin0.weight)
    torch.testing.assert_close(model(_x()), want)
    plain = model.merge_and_unload(safe_merge=True)
    assert type(plain.lin0) is nn.Linear
    torch.testing.assert_close(plain(_x()), want)


def test_refusals_leave_everything_as_it_was(tmp_path):
    model = peft_fast.get_peft_model(_base(), _toy())
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        model.base_model.model.lin0.toy_scale["default"].fill_(float("inf"))  # a broken adapter (inf == inf)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="mixed adapter batches"):
        model.eval()(_x(), adapter_names=["default"] * 5)
    other = peft_fast.get_peft_model(_base(), _toy())
    save_file({"base_model.model.lin0.toy_scale": torch.ones(7), "base_model.model.lin1.toy_scale": torch.ones(32)},
              str(tmp_path / "adapter_model.safetensors"))  # a file whose lin0 has the wrong shape
    snap = snapshot(other)
    with pytest.raises(ValueError, match="do not fit"):
        other.load_adapter(str(tmp_path), adapter_name="wrong")
    assert_unchanged(other, snap)
    with pytest.raises(ValueError, match="cannot be added beside"):
        other.add_adapter("lora", peft_fast.LoraConfig(target_modules=["lin2"]))
    assert_unchanged(other, snap)
