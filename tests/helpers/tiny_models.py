"""Shared helpers for the PEFT parity tests: the implementation under test, tiny models, pairs, comparisons.

`impl` is the library under test. By default it is `peft_fast`; with PEFT_FAST_TESTS_AGAINST_PEFT=1 it is
Hugging Face `peft` itself, which validates that every parity test encodes PEFT's real behaviour (tests of
peft_fast-only guarantees are skipped in that mode, see `peft_fast_only`).

`ref` is always Hugging Face `peft`.

Every model is built once per kind from a fixed seed and deep-copied for each library, so that the reference
and the implementation start from bit-identical base weights.
"""
from __future__ import annotations

import copy
import os
import warnings

import peft as ref
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

AGAINST_PEFT = os.environ.get("PEFT_FAST_TESTS_AGAINST_PEFT", "").strip() == "1"

if AGAINST_PEFT:
    import peft as impl  # noqa: F401  (the suite validates itself against PEFT)
else:
    import peft_fast as impl  # noqa: F401

peft_fast_only = pytest.mark.skipif(
    AGAINST_PEFT, reason="peft_fast-only guarantee (PEFT does not provide it); skipped when testing against PEFT"
)

# float32 everywhere; the reference path of peft_fast may order the LoRA matmuls differently from PEFT.
ATOL = 1e-5
RTOL = 1e-5

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
MLP_TARGETS = ["lin0", "lin1"]


def impl_patch(model, config, adapter_name="default"):
    """`peft_fast.patch`; PEFT has no such alias, so in PEFT mode it is `get_peft_model`."""
    if AGAINST_PEFT:
        return impl.get_peft_model(model, config, adapter_name=adapter_name)
    return impl.patch(model, config, adapter_name=adapter_name)


# ----------------------------------------------------------------------------------------------- models
class TinyMLP(nn.Module):
    """A plain torch model (not a transformers PreTrainedModel), all Linear layers with bias."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.lin2 = nn.Linear(32, 8)

    def forward(self, X):
        return self.lin2(self.norm(self.relu(self.lin1(self.relu(self.lin0(X))))))


def _llama():
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def _gpt2():
    # GPT-2 keeps its default dropouts (0.1): train-mode tests then also check that the RNG is consumed
    # in the same order as PEFT across base-model and LoRA dropouts.
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


_BUILDERS = {"llama": _llama, "gpt2": _gpt2, "mlp": TinyMLP}
_CACHE: dict[str, nn.Module] = {}


def base_model(kind: str) -> nn.Module:
    """A fresh deep copy of the base model of this kind (built once from seed 0)."""
    if kind not in _CACHE:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CACHE[kind] = _BUILDERS[kind]()
    return copy.deepcopy(_CACHE[kind])


def default_cfg(kind: str, **overrides) -> dict:
    kw = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
    if kind == "llama":
        kw["target_modules"] = list(LLAMA_TARGETS)
    elif kind == "gpt2":
        kw["target_modules"] = list(GPT2_TARGETS)
        kw["fan_in_fan_out"] = True
    else:
        kw["target_modules"] = list(MLP_TARGETS)
    kw.update(overrides)
    return kw


def inputs(kind: str, batch: int = 3, seq: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"X": torch.randn(batch, 16, generator=g)}
    return {"input_ids": torch.randint(1, 128, (batch, seq), generator=g)}


def out(model, x: dict, **kw) -> torch.Tensor:
    """Forward and return the tensor output (logits for transformers models)."""
    res = model(**x, **kw)
    return res.logits if hasattr(res, "logits") else res


def loss_of(model, x: dict) -> torch.Tensor:
    if "input_ids" in x:
        return model(**x, labels=x["input_ids"]).loss
    return model(**x).pow(2).mean()


# ----------------------------------------------------------------------------------------------- pairs
def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every parameter and buffer of src (PEFT) into dst (impl) by name; the names must match."""
    s_p, d_p = dict(src.named_parameters()), dict(dst.named_parameters())
    assert set(s_p) == set(d_p), name_diff(s_p, d_p)
    s_b, d_b = dict(src.named_buffers()), dict(dst.named_buffers())
    with torch.no_grad():
        for n, p in d_p.items():
            assert p.shape == s_p[n].shape, f"{n}: {tuple(p.shape)} != PEFT {tuple(s_p[n].shape)}"
            p.copy_(s_p[n])
        for n, b in d_b.items():
            if n in s_b and b.shape == s_b[n].shape:
                b.copy_(s_b[n])


def perturb_magnitudes(ref_model: nn.Module, impl_model: nn.Module, seed: int = 0) -> int:
    """Scale every DoRA magnitude of ref_model by a seeded, per-channel factor in [1, 1.5) and copy it into
    impl_model. A fresh magnitude equals ||W + s·B·A||, so the DoRA scale m / norm is exactly 1 and a test would
    pass with DoRA reduced to LoRA (merges, mixed batches, train-mode scaling): this makes the scale matter.
    Returns how many magnitude vectors were changed."""
    g = torch.Generator().manual_seed(seed)
    impl_p = dict(impl_model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_((1 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64)).to(p.device, p.dtype))
                impl_p[name].copy_(p)
                n += 1
    return n


def make_dora_pair(kind: str, **kw):
    """make_pair with use_dora=True and, when the weights are copied, magnitudes moved off their initial values."""
    base, r, i = make_pair(kind, use_dora=True, **kw)
    if kw.get("copy", True):
        assert perturb_magnitudes(r, i) > 0
    return base, r, i


def dora_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if hasattr(m, "lora_magnitude_vector") and len(m.lora_magnitude_vector)]


def raises_like_peft(exc_type, words, impl_call, ref_call):
    """Both libraries raise exc_type (or a subclass), with every key word in the message (case-insensitive)."""
    messages = []
    for call in (ref_call, impl_call):
        with pytest.raises(exc_type) as info:
            call()
        msg = str(info.value)
        for w in words:
            assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
        messages.append(msg)
    return messages


def count_calls(monkeypatch, module, *names: str) -> list:
    """Wrap module.<name> (each of `names`) so that each call appends to the returned list, then runs the real
    function. Layers pick their op when they plan, so spy before the forward that builds the plan."""
    calls = []

    def spy_on(name):
        real = getattr(module, name)

        def spy(*a, **k):
            calls.append(1)
            return real(*a, **k)

        monkeypatch.setattr(module, name, spy)

    for name in names:
        spy_on(name)
    return calls


def name_diff(a, b) -> str:
    a, b = set(a), set(b)
    return f"only in PEFT: {sorted(a - b)[:10]}  only in impl: {sorted(b - a)[:10]}"


def make_pair(kind: str, *, seed: int = 0, adapter_name: str = "default", copy: bool = True, base=None, **cfg):
    """(base, ref_model, impl_model): PEFT and the implementation wrapping identical copies of one base model.

    Each library gets its own LoraConfig object built from the same kwargs (PEFT mutates the config it is given).
    With copy=True the adapter weights of the PEFT model are copied into the implementation's model.
    """
    base = base_model(kind) if base is None else base
    kw = default_cfg(kind, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref_model = ref.get_peft_model(_deepcopy(base), ref.LoraConfig(**kw), adapter_name=adapter_name)
        torch.manual_seed(seed)
        impl_model = impl.get_peft_model(_deepcopy(base), impl.LoraConfig(**kw), adapter_name=adapter_name)
    if copy:
        copy_weights(ref_model, impl_model)
    return base, ref_model, impl_model


_deepcopy = copy.deepcopy


def add_both(ref_model, impl_model, name: str, kind: str, *, seed: int = 0, copy: bool = True, **cfg):
    kw = default_cfg(kind, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref_model.add_adapter(name, ref.LoraConfig(**kw))
        torch.manual_seed(seed)
        impl_model.add_adapter(name, impl.LoraConfig(**kw))
    if copy:
        copy_weights(ref_model, impl_model)


def set_active(model, names):
    """Activate one adapter (str) or several (list). PEFT's PeftModel.set_adapter only takes a str; several
    adapters are activated through its LoraModel (`model.base_model.set_adapter(list)`)."""
    if isinstance(names, str):
        model.set_adapter(names)
    elif isinstance(model, ref.PeftModel):
        model.base_model.set_adapter(names)
    else:
        model.set_adapter(names)


# ----------------------------------------------------------------------------------------------- comparisons
def assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=""):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}" if msg else m)


def param_table(model) -> dict:
    return {n: (tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()}


def assert_same_params(ref_model, impl_model):
    r, i = param_table(ref_model), param_table(impl_model)
    assert set(r) == set(i), name_diff(r, i)
    for n in r:
        assert r[n] == i[n], f"{n}: PEFT (shape, requires_grad)={r[n]} impl={i[n]}"


def assert_same_state(ref_model, impl_model, atol=ATOL, rtol=RTOL):
    rs, is_ = ref_model.state_dict(), impl_model.state_dict()
    assert set(rs) == set(is_), name_diff(rs, is_)
    for k in rs:
        assert_close(is_[k], rs[k], atol=atol, rtol=rtol, msg=k)


def snapshot(model) -> dict:
    """Everything an operation that fails must leave untouched."""
    snap = {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }
    if hasattr(model, "peft_config"):
        snap["peft_config"] = list(model.peft_config)
        snap["active_adapter"] = model.active_adapter
        snap["active_adapters"] = list(model.active_adapters)
    return snap


def assert_unchanged(model, snap: dict):
    now = snapshot(model)
    assert now["modules"] == snap["modules"], "modules changed"
    assert set(now["state"]) == set(snap["state"]), name_diff(snap["state"], now["state"])
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"{k} changed"
    assert now["requires_grad"] == snap["requires_grad"]
    for key in ("peft_config", "active_adapter", "active_adapters"):
        if key in snap:
            assert now[key] == snap[key], f"{key}: {now[key]} != {snap[key]}"


# (kind, LoraConfig overrides): the configurations that every parity file runs through.
CONFIG_CASES = [
    ("llama", {}),
    ("llama", {"target_modules": r".*\.(q_proj|v_proj)"}),
    ("llama", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["o_proj", "up_proj"]}),
    ("llama", {"target_modules": ["q_proj", "k_proj", "o_proj"], "exclude_modules": r".*layers\.1\.self_attn\.k_proj"}),
    ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}),
    ("llama", {"layers_to_transform": 0}),
    ("llama", {"rank_pattern": {"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2}, "alpha_pattern": {"v_proj": 32}}),
    ("llama", {"modules_to_save": ["lm_head"]}),
    ("llama", {"use_rslora": True, "lora_alpha": 16}),
    ("llama", {"use_dora": True}),
    ("gpt2", {}),
    ("gpt2", {"target_modules": "all-linear"}),
    ("gpt2", {"target_modules": r".*\.attn\.c_attn"}),
    ("gpt2", {"layers_to_transform": [0], "layers_pattern": "h"}),
    ("gpt2", {"bias": "all"}),
    ("gpt2", {"bias": "lora_only"}),
    ("gpt2", {"lora_bias": True}),
    ("gpt2", {"use_dora": True}),
    ("mlp", {}),
    ("mlp", {"target_modules": r"lin[01]"}),
    ("mlp", {"modules_to_save": ["lin2"]}),
    ("mlp", {"bias": "all"}),
    ("mlp", {"bias": "lora_only"}),
    ("mlp", {"lora_bias": True}),
    ("mlp", {"rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 3}}),
    ("mlp", {"use_rslora": True, "use_dora": True}),
]


def case_id(case) -> str:
    kind, kw = case
    return kind + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "-default")
