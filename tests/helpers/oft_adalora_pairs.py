"""Pairs for the OFT and AdaLoRA parity tests: PEFT and the implementation over identical copies of one base.

`TUNERS[name]` is (PEFT's config class, the implementation's config class); the implementation is peft_fast's
tuner, or PEFT itself under PEFT_FAST_TESTS_AGAINST_PEFT=1 (tiny_models.impl). Models: the tiny Llama, GPT-2 and
MLP of tiny_models, and lycoris_pairs' TinyConv (a 3x3 and a 1x1 Conv2d, two Conv1d, a Linear head).
"""
from __future__ import annotations

import copy
import warnings

import torch
from lycoris_pairs import conv_base, conv_inputs
from tiny_models import AGAINST_PEFT, GPT2_TARGETS, LLAMA_TARGETS, MLP_TARGETS, base_model, copy_weights, impl, \
    inputs, ref

if AGAINST_PEFT:
    from peft import AdaLoraConfig, OFTConfig
else:
    from peft_fast.tuners.adalora import AdaLoraConfig
    from peft_fast.tuners.oft import OFTConfig

TUNERS = {"oft": (ref.OFTConfig, OFTConfig), "adalora": (ref.AdaLoraConfig, AdaLoraConfig)}
# OFT adapts nn.Linear and Conv2d (not GPT-2's Conv1D, in PEFT either: its lm_head is the one Linear).
TARGETS = {
    "oft": {"llama": LLAMA_TARGETS, "gpt2": ["lm_head"], "mlp": MLP_TARGETS, "conv": ["conv0", "conv1", "head"]},
    "adalora": {"llama": LLAMA_TARGETS, "gpt2": GPT2_TARGETS, "mlp": MLP_TARGETS, "conv": ["conv0", "conv1", "head"]},
}
# AdaLoRA's schedule in these tests: 2 warm-up steps, budget cut over steps 3..8, 3 final steps (total 11).
SCHEDULE = {"init_r": 6, "target_r": 3, "total_step": 11, "tinit": 2, "tfinal": 3, "deltaT": 1}


def cfg(tuner: str, kind: str, **overrides) -> dict:
    """Config keywords with random (non-identity) OFT blocks; AdaLoRA starts from PEFT's init (E = 0: `perturb`
    moves it)."""
    kw: dict = {"target_modules": list(TARGETS[tuner][kind])}
    if tuner == "oft":
        kw.update(oft_block_size=8, r=0, init_weights=False)
        if kind == "conv":
            kw["oft_block_size"] = 3
    else:
        kw.update(SCHEDULE, lora_alpha=8)
        if kind == "gpt2":
            kw["fan_in_fan_out"] = True
    kw.update(overrides)
    return kw


def x_for(kind: str, **kw) -> dict:
    return conv_inputs(**kw) if kind == "conv" else inputs(kind, **kw)


def base_for(kind: str):
    return conv_base() if kind == "conv" else base_model(kind)


def build(tuner: str, kind: str, base=None, *, seed: int = 0, adapter_name: str = "default", **overrides):
    """(base, PEFT model, implementation model), each library with its own config object, both created under one
    seed (PEFT's inits are deterministic: the adapters start equal without copying)."""
    base = base if base is not None else base_for(kind)
    kw = cfg(tuner, kind, **overrides)
    ref_cls, impl_cls = TUNERS[tuner]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        r = ref.get_peft_model(copy.deepcopy(base), ref_cls(**copy.deepcopy(kw)), adapter_name=adapter_name)
        torch.manual_seed(seed)
        i = impl.get_peft_model(copy.deepcopy(base), impl_cls(**copy.deepcopy(kw)), adapter_name=adapter_name)
    return base, r, i


def perturb(ref_model, impl_model=None, seed: int = 0) -> None:
    """Move every adapter tensor of ref_model off its value (AdaLoRA's E starts at zero, an OFT block at identity
    with init_weights=True) and copy the result into impl_model."""
    g = torch.Generator().manual_seed(seed)
    scale = {"oft_R": 0.05, "lora_E": 1.0, "lora_A": 0.3, "lora_B": 0.3}
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            for part, s in scale.items():
                if f".{part}." in name:
                    p.add_((s * torch.randn(p.shape, generator=g)).to(p.dtype))
    if impl_model is not None:
        copy_weights(ref_model, impl_model)


def pair(tuner: str, kind: str, **overrides):
    """`build`, then PEFT's adapter tensors perturbed and copied into the implementation (a check that the names
    and shapes match)."""
    base, r, i = build(tuner, kind, **overrides)
    perturb(r, i)
    return base, r, i


def add_both(tuner: str, ref_model, impl_model, name: str, kind: str, *, seed: int = 0, **overrides) -> None:
    kw = cfg(tuner, kind, **overrides)
    ref_cls, impl_cls = TUNERS[tuner]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref_model.add_adapter(name, ref_cls(**copy.deepcopy(kw)))
        torch.manual_seed(seed)
        impl_model.add_adapter(name, impl_cls(**copy.deepcopy(kw)))
    perturb(ref_model, impl_model, seed + 1)


def make_4bit_pair(tuner: str, path, case, **overrides):
    """PEFT and the implementation over two fresh bitsandbytes 4-bit loads of the tiny Llama saved at `path`, the
    implementation's adapter tensors set to PEFT's (perturbed)."""
    from qlora_models import TARGETS as Q_TARGETS, load4

    ref_cls, impl_cls = TUNERS[tuner]
    kw = cfg(tuner, "llama", target_modules=list(Q_TARGETS), **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        r = ref.get_peft_model(load4(path, case), ref_cls(**copy.deepcopy(kw)))
        torch.manual_seed(0)
        i = impl.get_peft_model(load4(path, case), impl_cls(**copy.deepcopy(kw)))
    perturb(r, i)
    return r, i


def nf4_twin(tuner: str, path, case, impl_model):
    """The implementation's adapter over peft_fast.quantize's NF4Linear layers (the bytes bitsandbytes makes from
    the same weights), its tensors copied from `impl_model`."""
    from transformers import LlamaForCausalLM

    import peft_fast

    dtype, compute, double, qt = case
    model = peft_fast.quantize(LlamaForCausalLM.from_pretrained(path, dtype=dtype), quant_type=qt,
                               double_quant=double, compute_dtype=compute)
    config = impl_model.peft_config["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = impl.get_peft_model(model, TUNERS[tuner][1](**{k: v for k, v in config.to_dict().items()
                                                            if k not in ("peft_type", "peft_version", "auto_mapping")}))
    adapter = {k: v for k, v in impl_model.state_dict().items() if f".{tuner_prefix(tuner)}" in k}
    assert adapter and not twin.load_state_dict(adapter, strict=False).unexpected_keys
    return twin


def tuner_prefix(tuner: str) -> str:
    return "oft_R" if tuner == "oft" else "lora_"
