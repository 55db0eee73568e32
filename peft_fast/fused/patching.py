"""Where the fused decoder's operations go: instance-level forwards on the decoder's own modules (RMSNorm, the gated
MLP, the attention's rotary embedding, the causal-LM head and loss), so that one model is fused and every other
model of the same class in the process is not. Adapter layers inside those modules are untouched: the MLP's
projections and the attention's q/k/v/o are called as before, LoRA layers or plain ones.
"""
from __future__ import annotations

import functools
import inspect
import sys
import types
from typing import Callable, Optional

import torch
from torch import nn

from peft_fast.fused.ops import Ops

# transformers' decoder families whose modules follow the shapes below (tests/peft_fast/test_fused_decoder.py
# checks each against its unfused self).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
_GEMMA_NORMS = ("gemma", "gemma2", "gemma3")
MARK = "_peft_fast_fused"


def family_of(module: nn.Module) -> Optional[str]:
    parts = type(module).__module__.split(".")
    if len(parts) == 4 and parts[:2] == ["transformers", "models"] and parts[3] == f"modeling_{parts[2]}":
        return parts[2] if parts[2] in FAMILIES else None
    return None


def _act_name(act_fn: nn.Module, names) -> Optional[str]:
    from transformers.activations import ACT2FN

    for name in names:
        if name in ACT2FN and type(ACT2FN[name]) is type(act_fn):
            return name
    return None


# ---- instance forwards (bound with types.MethodType, so deepcopy rebinds them to the copy)
def _norm_forward(rms_norm: Callable, eps: float, gemma: bool) -> Callable:
    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, eps, gemma)
    return forward


def _mlp_forward(glu: Callable) -> Callable:
    def forward(self, x):
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x)))
    return forward


def _causal_lm_forward(loss_fn: Callable, params: tuple) -> Callable:
    def forward(self, *args, labels=None, **kwargs):
        kwargs.update(zip(params, args))
        labels = kwargs.pop("labels", labels)
        head = self.lm_head
        # The fused loss replaces logits the caller never sees: training with labels, the whole sequence, a
        # bias-free head that computes what nn.Linear computes (FSDP2's subclasses do; an adapted, modules_to_save or
        # 4-bit head keeps the unfused path). TRL's own fused head (fused_lm_head=True, from a wrapper around this
        # forward or under it) is left to TRL.
        if (labels is None or not self.training or kwargs.get("logits_to_keep") not in (None, 0)
                or type(head).forward is not nn.Linear.forward or head.bias is not None or "fused_lm_head" in kwargs):
            return previous_forward(self)(labels=labels, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        kwargs.pop("logits_to_keep", None)
        loss_kw = {k: kwargs.pop(k) for k in ("ignore_index", "shift_labels") if k in kwargs}
        if "num_items_in_batch" in kwargs:  # transformers passes it to the decoder too
            loss_kw["num_items_in_batch"] = kwargs["num_items_in_batch"]
        outputs = getattr(self, self.base_model_prefix)(**kwargs)
        loss = loss_fn(outputs[0], head.weight, labels, softcap=getattr(self.config, "final_logit_softcapping", None),
                       **loss_kw)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(loss=loss, logits=None,
                                     **{k: v for k, v in outputs.items() if k != "last_hidden_state"})
        return out.to_tuple() if return_dict is False else out
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


@functools.lru_cache(maxsize=None)
def attention_forward(cls: type, ops: Ops) -> Optional[Callable]:
    """cls.forward calling the backend's rotary embedding, or None when its forward does not call one by name."""
    inner = inspect.unwrap(cls.forward)
    original = inner.__globals__.get("apply_rotary_pos_emb")
    if original is None or "apply_rotary_pos_emb" not in inner.__code__.co_names:
        return None
    # The copied namespace is a registered module of its own: torch.compile guards an inlined function's globals
    # by importing its module by name, which must then find this namespace, not transformers' module.
    name = f"{__package__}._rope_{inner.__globals__['__name__'].replace('.', '_')}_{ops.name}"
    namespace = types.ModuleType(name)
    namespace.__dict__.update({k: v for k, v in inner.__globals__.items() if k not in ("__name__", "__spec__")})
    namespace.apply_rotary_pos_emb = ops.rope(original)
    sys.modules[name] = namespace
    new_inner = types.FunctionType(inner.__code__, namespace.__dict__, inner.__name__, inner.__defaults__,
                                   inner.__closure__)
    new_inner.__kwdefaults__, new_inner.__qualname__ = inner.__kwdefaults__, inner.__qualname__
    new_inner.__dict__.update(inner.__dict__)
    return _rebuilt(cls.forward, new_inner)


def previous_forward(module: nn.Module) -> Callable:
    """The forward this module had before it was fused: its class's, or an instance-level one (e.g. TRL's)."""
    prev = module.__dict__[MARK][2]
    return prev if prev is not None else types.MethodType(type(module).forward, module)


def _bind(module: nn.Module, kind: str, forward: Callable) -> None:
    # (part, our forward, the instance forward it replaced): bound methods, so that deepcopy rebinds all of them
    prev = module.__dict__.get("forward")
    ours = types.MethodType(forward, module)
    module.forward = ours
    module.__dict__[MARK] = (kind, ours, prev)


def fuse_module(module: nn.Module, ops: Ops) -> Optional[str]:
    """Fuse one module if it is a part the backend covers; returns which part, or None."""
    family = family_of(module)
    if family is None:
        return None
    name = type(module).__name__
    if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is not None:
            _bind(module, "rms_norm", _norm_forward(ops.rms_norm, eps, family in _GEMMA_NORMS))
            return "rms_norm"
    elif name.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        act = _act_name(module.act_fn, ops.glu)
        if act is not None:
            _bind(module, "glu", _mlp_forward(ops.glu[act]))
            return "glu"
    elif name.endswith("Attention"):
        forward = attention_forward(type(module), ops)
        if forward is not None:
            _bind(module, "rope", forward)
            return "rope"
    elif name.endswith("ForCausalLM") and hasattr(module, "lm_head"):
        params = tuple(inspect.signature(type(module).forward).parameters)[1:]
        # The class forward's signature stays visible: Trainer drops the dataset columns it does not name.
        _bind(module, "loss", functools.wraps(type(module).forward)(_causal_lm_forward(ops.causal_lm_loss, params)))
        return "loss"
    return None


def unfuse_module(module: nn.Module) -> bool:
    """Give the module the forward it had before fusing. False when it is not fused, or when its fused forward was
    wrapped since (e.g. by TRL's add_fused_lm_head): the wrapper calls it, so it stays."""
    state = module.__dict__.get(MARK)
    if state is None or module.__dict__.get("forward") != state[1]:
        return False
    _, _, prev = module.__dict__.pop(MARK)
    if prev is None:
        del module.__dict__["forward"]
    else:
        module.forward = prev
    return True


def part_of(module: nn.Module) -> Optional[str]:
    state = module.__dict__.get(MARK)
    return state[0] if state is not None else None
