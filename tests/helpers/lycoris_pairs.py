"""Pairs and checks for the LoHa / LoKr parity tests: PEFT and the implementation over identical copies of one base.

`TUNERS[name]` is (PEFT's config class, the implementation's config class); the implementation is peft_fast's
tuner, or PEFT itself under PEFT_FAST_TESTS_AGAINST_PEFT=1 (tiny_models.impl). `TinyConv` is a small model with
Conv2d and Conv1d layers (groups, stride, 1x1 and larger kernels) and a Linear head.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tiny_models import AGAINST_PEFT, LLAMA_TARGETS, MLP_TARGETS, assert_close, base_model, copy_weights, impl, \
    inputs, loss_of, name_diff, out, ref

if AGAINST_PEFT:
    from peft import LoHaConfig, LoKrConfig
else:
    from peft_fast.tuners.loha import LoHaConfig
    from peft_fast.tuners.lokr import LoKrConfig

TUNERS = {"loha": (ref.LoHaConfig, LoHaConfig), "lokr": (ref.LoKrConfig, LoKrConfig)}
CONV_TARGETS = ["conv0", "conv1", "conv2", "conv3"]


class TinyConv(nn.Module):
    """conv0: 3x3 Conv2d; conv1: 1x1 Conv2d, stride 2; conv2: 3-tap Conv1d with groups=2; conv3: 1-tap Conv1d;
    head: Linear."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 12, 1, stride=2)
        self.conv2 = nn.Conv1d(12, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv1d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, X):
        h = torch.relu(self.conv1(torch.relu(self.conv0(X))))  # [N, 12, 4, 4]
        h = torch.relu(self.conv2(h.flatten(2)))  # [N, 8, 16]
        return self.head(self.conv3(h).mean(-1))


_CONV: dict = {}


def conv_base() -> TinyConv:
    if "conv" not in _CONV:
        torch.manual_seed(0)
        _CONV["conv"] = TinyConv()
    return copy.deepcopy(_CONV["conv"])


def conv_inputs(batch: int = 3, seed: int = 1) -> dict:
    return {"X": torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))}


def cfg(kind: str, **overrides) -> dict:
    """Config keywords: random factors (init_weights=False, so that no factor starts at zero), small ranks."""
    kw = {"r": 4, "alpha": 8, "init_weights": False,
          "target_modules": {"llama": LLAMA_TARGETS, "mlp": MLP_TARGETS, "conv": CONV_TARGETS}.get(kind)}
    kw["target_modules"] = list(kw["target_modules"]) if kw["target_modules"] else None
    kw.update(overrides)
    return kw


def build(tuner: str, kind: str, base=None, *, seed: int = 0, adapter_name: str = "default", **overrides):
    """(base, PEFT model, implementation model), each library with its own config object, both created under one
    seed (so where PEFT's init is deterministic, the adapters start equal without copying)."""
    base = base if base is not None else (conv_base() if kind == "conv" else base_model(kind))
    kw = cfg(kind, **overrides)
    ref_cls, impl_cls = TUNERS[tuner]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        r = ref.get_peft_model(copy.deepcopy(base), ref_cls(**kw), adapter_name=adapter_name)
        torch.manual_seed(seed)
        i = impl.get_peft_model(copy.deepcopy(base), impl_cls(**kw), adapter_name=adapter_name)
    return base, r, i


def pair(tuner: str, kind: str, **overrides):
    """`build`, then PEFT's adapter weights copied into the implementation (a check that the names match)."""
    base, r, i = build(tuner, kind, **overrides)
    copy_weights(r, i)
    return base, r, i


def add_both(tuner: str, ref_model, impl_model, name: str, kind: str, *, seed: int = 0, **overrides) -> None:
    kw = cfg(kind, **overrides)
    ref_cls, impl_cls = TUNERS[tuner]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref_model.add_adapter(name, ref_cls(**kw))
        torch.manual_seed(seed)
        impl_model.add_adapter(name, impl_cls(**kw))
    copy_weights(ref_model, impl_model)


def x_for(kind: str, **kw) -> dict:
    return conv_inputs(**kw) if kind == "conv" else inputs(kind, **kw)


def conv_loss(model, x: dict) -> torch.Tensor:
    return model(**x).pow(2).mean()


def loss_for(kind: str, model, x: dict) -> torch.Tensor:
    return conv_loss(model, x) if kind == "conv" else loss_of(model, x)


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_train_step_matches(kind: str, r, i, x: dict, seed: int = 3, steps: int = 1, skip=()) -> None:
    """Train mode, `steps` seeded forward+backward passes: the same loss and the same gradients as PEFT (names in
    `skip` excepted). With rank/module dropout the seeds make both draw the same masks, if drawn in PEFT's order."""
    r.train()
    i.train()
    trained = False
    for step in range(steps):
        for m in (r, i):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(seed + step)
        lr = loss_for(kind, r, x)
        torch.manual_seed(seed + step)
        li = loss_for(kind, i, x)
        assert_close(li, lr, msg=f"loss, step {step}")
        assert li.requires_grad == lr.requires_grad  # module dropout may skip every adapter of a small model
        if not lr.requires_grad:
            continue
        lr.backward()
        li.backward()
        gr, gi = grads(r), grads(i)
        assert set(gr) == set(gi), name_diff(gr, gi)
        trained = trained or bool(gr)
        for n in gr:
            if not any(s in n for s in skip):
                assert_close(gi[n], gr[n], msg=f"grad {n}, step {step}")
    assert trained, "no step reached the adapters"


def assert_eval_matches(kind: str, r, i, x: dict, **kw) -> None:
    r.eval()
    i.eval()
    with torch.no_grad():
        assert_close(out(i, x, **kw), out(r, x, **kw))


def read_config(path) -> dict:
    with open(os.path.join(path, "adapter_config.json")) as f:
        data = json.load(f)
    data.pop("peft_version")
    if isinstance(data.get("target_modules"), list):  # PEFT stores a set: the order is arbitrary
        data["target_modules"] = sorted(data["target_modules"])
    return data


def assert_same_files(impl_dir, ref_dir) -> None:
    """Same adapter_config.json (peft_version aside), same tensors under the same keys, same metadata (peft_fast
    adds its config copy, so that a save interrupted between the two files is refused at load)."""
    assert read_config(impl_dir) == read_config(ref_dir)
    name = "adapter_model.safetensors"
    iw, rw = load_file(os.path.join(impl_dir, name)), load_file(os.path.join(ref_dir, name))
    assert set(iw) == set(rw), name_diff(rw, iw)
    for k in rw:
        assert iw[k].dtype == rw[k].dtype and torch.equal(iw[k], rw[k]), k
    with safe_open(os.path.join(impl_dir, name), "pt") as fi, safe_open(os.path.join(ref_dir, name), "pt") as fr:
        meta = dict(fi.metadata())
        meta.pop("peft_fast_config", None)
        assert meta == fr.metadata()


def perturb(model, seed: int = 0) -> None:
    """Move every adapter factor off its value (zero-initialised factors included), so outputs depend on all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("hada_", "lokr_")):
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
