"""PEFT and the implementation side by side for the IA3 and VeRA parity tests: config classes, pairs over identical
base models, perturbed adapter weights, 4-bit pairs.

With PEFT_FAST_TESTS_AGAINST_PEFT=1 the implementation's classes are PEFT's own (tiny_models.AGAINST_PEFT).
"""
from __future__ import annotations

import copy
import warnings

import torch

from tiny_models import AGAINST_PEFT, base_model, copy_weights, impl, ref

if AGAINST_PEFT:
    from peft import IA3Config, VeraConfig
else:
    from peft_fast.tuners.ia3 import IA3Config
    from peft_fast.tuners.vera import VeraConfig

IMPL_CONFIGS = {"ia3": IA3Config, "vera": VeraConfig}
REF_CONFIGS = {"ia3": ref.IA3Config, "vera": ref.VeraConfig}

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"], "mlp": ["lin0", "lin1"]}
FEEDFORWARD = {"llama": ["down_proj"], "gpt2": ["mlp.c_proj"], "mlp": ["lin1"]}


def cfg(tuner: str, kind: str, **overrides) -> dict:
    """Random (non-identity, non-zero) initial adapters by default, so that a test of the adapter's math can fail."""
    kw: dict = {"target_modules": list(TARGETS[kind])}
    if tuner == "ia3":
        # PEFT wants feedforward_modules to be a subset of target_modules (as sets of names)
        kw["target_modules"] = sorted(set(TARGETS[kind]) - {"c_proj"} | set(FEEDFORWARD[kind]))
        kw.update(feedforward_modules=list(FEEDFORWARD[kind]), init_ia3_weights=False)
    else:
        kw.update(r=8, init_weights=False)
    if kind == "gpt2":
        kw["fan_in_fan_out"] = True
    kw.update(overrides)
    return kw


def configs(tuner: str, kind: str, **overrides):
    """(PEFT's config, the implementation's config) built from the same keyword arguments (PEFT mutates its own)."""
    kw = cfg(tuner, kind, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return REF_CONFIGS[tuner](**copy.deepcopy(kw)), IMPL_CONFIGS[tuner](**copy.deepcopy(kw))


def perturb(ref_model, impl_model, seed: int = 0) -> None:
    """Multiply every trainable adapter tensor of ref_model by a seeded factor in [0.5, 1.5) and copy the result into
    impl_model (VeRA's Λ_b starts as ones, IA3's vectors as ones with init on: make every element matter)."""
    g = torch.Generator().manual_seed(seed)
    impl_params = dict(impl_model.named_parameters())
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if any(k in name for k in ("ia3_l", "vera_lambda")):
                p.mul_((0.5 + torch.rand(p.shape, generator=g)).to(p.dtype))
                impl_params[name].copy_(p)


def make_pair(tuner: str, kind: str, *, seed: int = 0, copy_weights_over: bool = True, base=None,
              adapter_name: str = "default", **overrides):
    """(base, PEFT model, implementation model) over identical copies of one base; with copy_weights_over the
    implementation's adapter tensors are set to PEFT's, perturbed."""
    base = base_model(kind) if base is None else base
    ref_cfg, impl_cfg = configs(tuner, kind, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref_model = ref.get_peft_model(copy.deepcopy(base), ref_cfg, adapter_name=adapter_name)
        torch.manual_seed(seed)
        impl_model = impl.get_peft_model(copy.deepcopy(base), impl_cfg, adapter_name=adapter_name)
    if copy_weights_over:
        copy_weights(ref_model, impl_model)
        perturb(ref_model, impl_model, seed)
    return base, ref_model, impl_model


def add_both(tuner: str, ref_model, impl_model, name: str, kind: str, *, seed: int = 0, **overrides) -> None:
    """The same new adapter in both models, the implementation's tensors set to PEFT's (perturbed)."""
    ref_cfg, impl_cfg = configs(tuner, kind, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref_model.add_adapter(name, ref_cfg)
        torch.manual_seed(seed)
        impl_model.add_adapter(name, impl_cfg)
    copy_weights(ref_model, impl_model)
    perturb(ref_model, impl_model, seed + 1)


def grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def make_4bit_pair(tuner: str, path, case, **overrides):
    """PEFT and the implementation over two fresh bitsandbytes 4-bit loads of the tiny Llama saved at `path`."""
    from qlora_models import TARGETS as Q_TARGETS, load4

    kw = {"target_modules": list(Q_TARGETS), **overrides}
    if tuner == "ia3":
        # PEFT's 4-bit IA3 layers output float32 in a bf16 model: q, k and v must all be adapted, or attention
        # meets mixed dtypes (in PEFT as here).
        kw.setdefault("target_modules", list(Q_TARGETS))
        kw["target_modules"] = sorted(set(kw["target_modules"]) | {"k_proj"})
        kw.setdefault("feedforward_modules", ["down_proj"])
    ref_cfg, impl_cfg = configs(tuner, "llama", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref_model = ref.get_peft_model(load4(path, case), ref_cfg)
        torch.manual_seed(0)
        impl_model = impl.get_peft_model(load4(path, case), impl_cfg)
    copy_weights(ref_model, impl_model)
    perturb(ref_model, impl_model)
    return ref_model, impl_model
