"""Where the fused decoder's operations go: each fused module of a model gets a subclass of its own class whose
forward calls the backend's op (RMSNorm, the gated MLP's activation, the attention's rotary embedding, the causal-LM
loss without logits). Swapping one module's class changes that module only: every other model of the class in the
process stays as it was. Adapter layers inside those modules are untouched: the MLP's projections and the attention's
q/k/v/o are called as before, LoRA layers or plain ones.

A class swap (not an instance-level forward) is what keeps the fused forward with the module through deepcopy,
nn.DataParallel's replicas (which copy __dict__, so a bound method would still point at the original module),
pickling (a fused class is found by name, `__getattr__` below, in any process) and accelerate's hooks (which call
`module._old_forward`, rebound here). Instance-level forwards set by others (TRL's fused LM head) are left alone.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
import warnings
from typing import Callable, Optional

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from peft_fast.bases.view import has_hooks
from peft_fast.fused.ops import ops_for

# transformers' decoder families whose modules follow the shapes below (tests/peft_fast/test_fused_decoder.py
# checks each against its unfused self).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe")
_GEMMA_NORMS = ("gemma", "gemma2", "gemma3")
_MOE = ("mixtral", "qwen2_moe", "qwen3_moe")  # causal LMs that may add a router loss (then their logits are kept)
_SOFTCAP = ("gemma2", "gemma3")  # families whose causal LM soft-caps its final logits
_ACTS = ("silu", "swish", "gelu_pytorch_tanh")  # the gated MLP activations both backends fuse
_PREFIX = "Fused__"


def base_class(cls: type) -> type:
    return cls.__dict__.get("_peft_fast_base", cls)


def part_of(module: nn.Module) -> Optional[str]:
    return type(module).__dict__.get("_peft_fast_part")


def family_of(module: nn.Module) -> Optional[str]:
    parts = base_class(type(module)).__module__.split(".")
    if len(parts) == 4 and parts[:2] == ["transformers", "models"] and parts[3] == f"modeling_{parts[2]}":
        return parts[2] if parts[2] in FAMILIES else None
    return None


def _act_name(act_fn: nn.Module) -> Optional[str]:
    from transformers.activations import ACT2FN

    for name in _ACTS:
        if name in ACT2FN and type(ACT2FN[name]) is type(act_fn):
            return name
    return None


# ---- the fused forwards, one per part, built once per (class, part, backend)
def _norm_forward(base: type, backend: str, family: str, eps_attr: str) -> Callable:
    ops = ops_for(backend)
    gemma = family in _GEMMA_NORMS
    # One compiled copy per rank and normalised size: Qwen3's and Gemma 3's q/k norms ([..., heads, head_dim]) would
    # otherwise share the layer norms' dynamo cache, whose recompile limit a generate() then exhausts.
    copies: dict[tuple[int, int], Callable] = {}

    def forward(self, hidden_states):
        if torch.compiler.is_compiling():  # inlined into an outer compile: no compiled copy made inside a trace
            return ops.rms_norm(hidden_states, self.weight, getattr(self, eps_attr), gemma)
        key = (hidden_states.dim(), hidden_states.shape[-1])
        rms_norm = copies.get(key)
        if rms_norm is None:
            rms_norm = copies.setdefault(key, ops.per_class(ops.rms_norm, f"{base.__name__}_{key[0]}d{key[1]}"))
        return rms_norm(hidden_states, self.weight, getattr(self, eps_attr), gemma)
    return forward


def _mlp_forward(base: type, backend: str, act: str) -> Callable:
    ops = ops_for(backend)
    glu = ops.per_class(ops.glu[act], base.__name__)

    def forward(self, x):
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x)))
    return forward


def _keeps_logits(model, labels, kwargs, moe: bool) -> bool:
    """When the model computes its logits as usual: no labels, eval mode, only some positions, a tuple output, a
    loss of its own (loss_function / loss_type), a mixture of experts' router loss, TRL's fused head
    (fused_lm_head=True), or a head that is not a plain bias-free matmul: adapted, modules_to_save, 4-bit, or with
    hooks (FSDP2 or ZeRO-3 gathering its weight)."""
    head = model.lm_head
    keep = kwargs.get("logits_to_keep")
    router = kwargs.get("output_router_logits")
    if moe and (router if router is not None else getattr(model.config, "output_router_logits", False)):
        return True
    return (labels is None or not model.training or not (keep is None or (isinstance(keep, int) and keep == 0))
            or kwargs.get("return_dict") is False or "fused_lm_head" in kwargs
            or "_loss_function" in model.__dict__ or getattr(model, "loss_type", None) not in (None, "ForCausalLM")
            or type(head).forward is not nn.Linear.forward or head.bias is not None or has_hooks(head)
            or getattr(head, "_hf_hook", None) is not None)


def _causal_lm_forward(base: type, backend: str, family: str) -> Callable:
    loss_fn = ops_for(backend).causal_lm_loss
    params = tuple(inspect.signature(base.forward).parameters)[1:]
    softcap_family, moe = family in _SOFTCAP, family in _MOE

    @functools.wraps(base.forward)  # its signature: Trainer drops the dataset columns forward does not name
    def forward(self, *args, labels=None, **kwargs):
        kwargs.update(zip(params, args))
        labels = kwargs.pop("labels", labels)
        if type(self) is base or _keeps_logits(self, labels, kwargs, moe):  # (base: a stale bound method, unfused)
            return base.forward(self, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        loss_kw = {k: kwargs.pop(k) for k in ("ignore_index", "shift_labels") if k in kwargs}
        if "num_items_in_batch" in kwargs:  # transformers passes it to the decoder too
            loss_kw["num_items_in_batch"] = kwargs["num_items_in_batch"]
        outputs = getattr(self, self.base_model_prefix)(**kwargs)
        softcap = getattr(self.config, "final_logit_softcapping", None) if softcap_family else None
        loss = loss_fn(outputs[0], self.lm_head.weight, labels, softcap=softcap, **loss_kw)
        output = MoeCausalLMOutputWithPast if moe else CausalLMOutputWithPast
        return output(loss=loss, logits=None, **{k: v for k, v in outputs.items() if k != "last_hidden_state"})
    return forward


# ---- the rotary embedding: the attention's own forward, run with a different apply_rotary_pos_emb
def _rebuilt(fn: Callable, inner: Callable) -> Optional[Callable]:
    """`fn` with its innermost function (through functools.wraps decorators) replaced by `inner`."""
    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is None:
        return inner
    new_wrapped = _rebuilt(wrapped, inner)
    cells = fn.__closure__ or ()
    hits = [i for i, c in enumerate(cells) if _contents(c) is wrapped]
    if new_wrapped is None or len(hits) != 1:
        return None
    closure = tuple(types.CellType(new_wrapped) if i == hits[0] else c for i, c in enumerate(cells))
    out = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    out.__kwdefaults__, out.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    out.__dict__.update(fn.__dict__)
    out.__wrapped__ = new_wrapped
    return out


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _plain_function(fn):
    """The function under Hugging Face `kernels`' wrapper. With `kernels` installed, transformers (>= 5.25) turns
    apply_rotary_pos_emb into a module instance (kernels' `Func`) calling the function from its closure, and the
    attention's forward routes calls through that same instance; compiling the instance makes dynamo track one object
    from two places, which it refuses. The fused forward never routes through kernels, so it takes the function."""
    if fn is None or isinstance(fn, types.FunctionType) or not isinstance(fn, torch.nn.Module):
        return fn
    forward = getattr(type(fn), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is not None and "func" in code.co_freevars:
        inner = _contents(forward.__closure__[code.co_freevars.index("func")])
        if isinstance(inner, types.FunctionType):
            return inner
    return fn


def _attention_forward(base: type, backend: str) -> Optional[Callable]:
    """base.forward calling the backend's rotary embedding, or None when it does not call one by name."""
    inner = inspect.unwrap(base.forward)
    original = _plain_function(inner.__globals__.get("apply_rotary_pos_emb"))
    if original is None or "apply_rotary_pos_emb" not in inner.__code__.co_names:
        return None
    # The copied namespace is a registered module of its own: torch.compile guards an inlined function's globals
    # by importing its module by name, which must then find this namespace, not transformers' module.
    name = f"{__name__}._rope_{inner.__globals__['__name__'].replace('.', '_')}_{backend}"
    namespace = sys.modules.get(name)
    if namespace is None:
        namespace = types.ModuleType(name)
        namespace.__dict__.update({k: v for k, v in inner.__globals__.items() if k not in ("__name__", "__spec__")})
        namespace.apply_rotary_pos_emb = ops_for(backend).rope(original)
        sys.modules[name] = namespace
    new_inner = types.FunctionType(inner.__code__, namespace.__dict__, inner.__name__, inner.__defaults__,
                                   inner.__closure__)
    new_inner.__kwdefaults__, new_inner.__qualname__ = inner.__kwdefaults__, inner.__qualname__
    new_inner.__dict__.update(inner.__dict__)
    # The other globals the forward reads come from the live module at each call: a later patch of the modeling
    # module (an attention function, a mask helper) reaches fused models as it reaches unfused ones.
    live = inner.__globals__
    names = tuple(n for n in inner.__code__.co_names if n in live and n != "apply_rotary_pos_emb")
    copied = namespace.__dict__

    @functools.wraps(new_inner)
    def synced(*args, **kwargs):
        if not torch.compiler.is_compiling():  # (an outer compile guards on the namespace itself)
            for n in names:
                if n in live:
                    copied[n] = live[n]
        return new_inner(*args, **kwargs)
    return _rebuilt(base.forward, synced)


# ---- fused classes, by name (what pickle stores: `peft_fast.fused.patching.Fused__...`)
def _class_name(base: type, part: str, backend: str, detail: str) -> str:
    return f"{_PREFIX}{backend}__{part}__{detail}__{base.__module__.replace('.', '_o_')}__{base.__name__}"


@functools.lru_cache(maxsize=None)
def fused_class(base: type, part: str, backend: str, detail: str) -> Optional[type]:
    """`base` with the fused forward of `part` (detail: the norm's eps attribute, the MLP's activation)."""
    family = base.__module__.split(".")[2]
    if part == "rms_norm":
        forward = _norm_forward(base, backend, family, detail)
    elif part == "glu":
        forward = _mlp_forward(base, backend, detail)
    elif part == "rope":
        forward = _attention_forward(base, backend)
    else:
        forward = _causal_lm_forward(base, backend, family)
    if forward is None:
        return None
    name = _class_name(base, part, backend, detail)
    return type(base.__name__, (base,), {  # base's __name__: config.json's "architectures" names the model's class
        "forward": forward, "__module__": __name__, "__qualname__": name, "_peft_fast_base": base,
        "_peft_fast_part": part, "_peft_fast_backend": backend})


def __getattr__(name: str):
    """A fused class named by pickle, rebuilt in a process that has not fused that class yet."""
    if not name.startswith(_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    backend, part, detail, module, cls = name[len(_PREFIX):].split("__")
    base = getattr(importlib.import_module(module.replace("_o_", ".")), cls)
    return fused_class(base, part, backend, detail)


def _plan(module: nn.Module) -> Optional[tuple[str, str]]:
    """(part, detail) when the module is one the fused decoder covers."""
    if family_of(module) is None:
        return None
    name = type(module).__name__
    if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
        eps_attr = next((a for a in ("variance_epsilon", "eps") if isinstance(getattr(module, a, None), float)), None)
        return ("rms_norm", eps_attr) if eps_attr else None
    if name.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        act = _act_name(module.act_fn)
        return ("glu", act) if act else None
    if name.endswith("Attention"):
        return "rope", ""
    if name.endswith("ForCausalLM") and hasattr(module, "lm_head"):
        return "loss", ""
    return None


def _rebind_old_forward(module: nn.Module, old_cls: type, new_cls: type) -> None:
    """accelerate's hooks call module._old_forward, bound when they were added: bind it to the new class's forward."""
    old = module.__dict__.get("_old_forward")
    if isinstance(old, types.MethodType) and old.__self__ is module and old.__func__ is old_cls.forward:
        module._old_forward = types.MethodType(new_cls.forward, module)


def fuse_module(module: nn.Module, backend: str) -> Optional[str]:
    """Fuse one module if it is a part the backend covers (and is not fused already); returns which part."""
    if part_of(module) is not None:
        return None
    plan = _plan(module)
    try:
        cls = fused_class(type(module), plan[0], backend, plan[1]) if plan else None
    except Exception as e:  # a module that does not have the shape its family's modules have: it stays unfused
        warnings.warn(f"fused decoder: {type(module).__name__} stays unfused ({type(e).__name__}: {e})", stacklevel=3)
        return None
    if cls is None:
        return None
    old = type(module)
    module.__class__ = cls
    _rebind_old_forward(module, old, cls)
    return plan[0]


def unfuse_module(module: nn.Module) -> bool:
    if part_of(module) is None:
        return False
    fused = type(module)
    module.__class__ = base_class(fused)
    _rebind_old_forward(module, fused, module.__class__)
    return True
