"""(IA)³ on convolutions against PEFT 0.21.2's ia3.Conv2d / ia3.Conv3d: the vectors' shapes and initialisation,
forward and gradients with input-scaled (feedforward) and output-scaled layers, grouped convolutions, files both
ways, merging and unmerging, the layers' names in the status, and Conv1d refused as in PEFT."""
import warnings

import pytest
import torch
from torch import nn

from tiny_models import assert_close, impl, ref


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv3d(8, 4, 1)
        self.head = nn.Linear(4, 5)
        self.c1d = nn.Conv1d(4, 4, 1)

    def forward(self, X):
        h = torch.relu(self.c1(torch.relu(self.c0(X))))
        h = self.c3(h.unsqueeze(2)).mean((2, 3, 4))
        return self.head(self.c1d(h.unsqueeze(-1)).squeeze(-1))


def _base():
    torch.manual_seed(0)
    return ConvNet()


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
TARGETS = ["c0", "c1", "c3", "head"]


def _pair(feedforward, **kw):
    models = []
    for lib in (ref, impl):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.append(lib.get_peft_model(_base(), lib.IA3Config(target_modules=TARGETS, init_ia3_weights=False,
                                                                    feedforward_modules=feedforward, **kw)))
    return models


FEEDFORWARD = [[], ["c1"], ["c0", "c3"]]  # c1 is grouped: its input scale meets the weight's groups when merged


@pytest.mark.parametrize("feedforward", FEEDFORWARD, ids=str)
def test_vectors_forward_and_gradients_match_peft(feedforward):
    r, i = _pair(feedforward)
    rs, is_ = r.state_dict(), i.state_dict()
    assert rs.keys() == is_.keys()
    for k in rs:
        assert rs[k].shape == is_[k].shape and torch.equal(rs[k], is_[k]), k
    yr, yi = r(X=X), i(X=X)
    assert_close(yi, yr)
    yr.square().sum().backward()
    yi.square().sum().backward()
    gr = {n: p.grad for n, p in r.named_parameters() if p.grad is not None}
    gi = {n: p.grad for n, p in i.named_parameters() if p.grad is not None}
    assert gr.keys() == gi.keys() and any("c3.ia3_l" in n for n in gr)
    for n in gr:
        assert_close(gi[n], gr[n], msg=n)


@pytest.mark.parametrize("feedforward", FEEDFORWARD, ids=str)
def test_files_both_ways(feedforward, tmp_path):
    r, i = _pair(feedforward)
    with torch.no_grad():
        for p in r.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    r.save_pretrained(tmp_path / "ref")
    i.load_state_dict(r.state_dict())
    i.save_pretrained(tmp_path / "impl")
    want = r(X=X)
    for src in ("ref", "impl"):
        for lib in (ref, impl):
            loaded = lib.PeftModel.from_pretrained(_base(), str(tmp_path / src))
            assert_close(loaded(X=X), want, msg=f"{src} -> {lib.__name__}")


@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("feedforward", FEEDFORWARD, ids=str)
def test_merge_and_unmerge_match_peft(feedforward, safe_merge):
    r, i = _pair(feedforward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (r, i):
            model.merge_adapter(safe_merge=safe_merge)
        for key in ("c0", "c1", "c3"):
            assert torch.equal(getattr(i.base_model.model, key).base_layer.weight,
                               getattr(r.base_model.model, key).base_layer.weight), key
        assert_close(i(X=X), r(X=X))
        for model in (r, i):
            model.unmerge_adapter()
    assert_close(i.state_dict()["base_model.model.c1.base_layer.weight"],
                 r.state_dict()["base_model.model.c1.base_layer.weight"])
    assert [s.module_type for s in i.get_layer_status()] == [s.module_type for s in r.get_layer_status()]


@pytest.mark.parametrize("feedforward", FEEDFORWARD, ids=str)
def test_dtypes_under_autocast_and_16_bit_bases_match_peft(feedforward):
    """PEFT's conv layers keep their own order (the output cast to the adapter's dtype, then x's): not the Linear
    one's."""
    r, i = _pair(feedforward)
    inputs = {"c0": X, "c1": torch.randn(2, 8, 5, 5), "c3": torch.randn(2, 8, 1, 3, 3)}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for key, x in inputs.items():  # layer by layer: the model's Linear head makes its output bf16 anyway
            yr, yi = getattr(r.base_model.model, key)(x), getattr(i.base_model.model, key)(x)
            assert yi.dtype == yr.dtype == torch.float32, key
            assert_close(yi, yr, msg=key)
    for model in (r, i):
        model.to(torch.bfloat16)
    with torch.no_grad():
        yr, yi = r(X=X.bfloat16()), i(X=X.bfloat16())
    assert yi.dtype == yr.dtype
    assert_close(yi.float(), yr.float())


def test_conv1d_is_refused_as_in_peft():
    for lib in (ref, impl):
        with pytest.raises((TypeError, ValueError)):
            lib.get_peft_model(_base(), lib.IA3Config(target_modules=["c1d"], feedforward_modules=[]))
