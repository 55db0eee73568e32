"""`peft-fast merge` and `peft-fast quantize`, which load whole models with transformers, and `load_quantized`,
which loads what `quantize` saved back as NF4Linear layers, without bitsandbytes.

What `quantize` writes is a transformers 4-bit checkpoint: NF4Linear's state dict already uses transformers'
4-bit keys (`weight.absmax`, `weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__nf4`), and
config.json gets the bitsandbytes `quantization_config` naming the layers left dense, so transformers +
bitsandbytes loads it as it loads its own. The file is written with safetensors directly, not with
`save_pretrained`, which refuses the double-quantization codebook the layers share (aliased tensors are stored
as copies).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional

import torch
import torch.nn as nn

from . import files
from .bases.nf4_linear import NF4Linear
from .bases.quantize import quantize as quantize_model
from .cli_common import CliError, UsageError, check_output, staged_output
from .config import CONFIG_NAME
from .names import check_adapter_name
from .peft_model import PeftModel

# PEFT's task types -> the transformers Auto class that loads a base model for them (AutoPeftModel's mapping).
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}
QUANTIZE_KEY = "peft_fast_quantize"  # safetensors metadata: the settings `quantize` used (compute dtype included)
MODEL_WEIGHTS = "model.safetensors"


def _dtype(name: Optional[str]) -> Any:
    return name if name in (None, "auto") else getattr(torch, name)


def _auto_class(task_type: Optional[str], auto_mapping: Optional[dict] = None):
    import transformers

    if task_type is None and auto_mapping and hasattr(transformers, str(auto_mapping.get("base_model_class"))):
        return getattr(transformers, auto_mapping["base_model_class"])  # PEFT records it for task-less adapters
    return getattr(transformers, AUTO_CLASSES.get(task_type or "CAUSAL_LM", "AutoModelForCausalLM"))


def _load_base(base: str, cls, dtype: Optional[str]):
    if not os.path.isdir(base) and (os.path.exists(base) or base.startswith((".", "/", "~"))):
        raise UsageError(f"{base}: no such model folder")
    try:
        return cls.from_pretrained(base, dtype=_dtype(dtype))
    except OSError as exc:  # transformers' own message says what is missing; say where it looked
        where = "" if os.path.isdir(base) else " (not a local folder, so it was looked up on the Hugging Face Hub)"
        raise CliError(f"cannot load the model {base}{where}: {exc}") from None


def _save_tokenizer(base: str, out: str) -> bool:
    """Best effort: a model without a tokenizer (or one transformers cannot read) is saved without one."""
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(out)
        return True
    except Exception:
        return False


# --- merge -----------------------------------------------------------------------------------------------------
def merge(args: argparse.Namespace) -> int:
    try:
        check_adapter_name(args.adapter_name)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    sub = None if args.adapter_name == "default" else args.adapter_name
    folder = os.path.join(args.dir, sub) if sub else args.dir
    if not os.path.isdir(args.dir):
        raise UsageError(f"{args.dir}: no such adapter folder")
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        names = sorted(e for e in os.listdir(args.dir) if os.path.isfile(os.path.join(args.dir, e, CONFIG_NAME)))
        found = f"; adapters in subfolders: {', '.join(names)} (pick one with --adapter-name)" if names else ""
        raise UsageError(f"{folder} is not an adapter folder: no {CONFIG_NAME}{found}")
    check_output(args.out, args.force, sources=(args.dir,))
    with open(config_path, encoding="utf-8") as fh:
        raw = json.load(fh)
    cls = _auto_class(args.task_type or raw.get("task_type"), raw.get("auto_mapping"))
    model = _load_base(args.base, cls, args.dtype)
    peft_model = PeftModel.from_pretrained(model, args.dir, subfolder=sub)
    merged = peft_model.merge_and_unload(safe_merge=args.safe)
    with staged_output(args.out) as stage:
        merged.save_pretrained(stage)
        tokenizer = _save_tokenizer(args.base, stage)
    print(f"merged adapter {args.adapter_name!r} of {args.dir} into {args.base} ({cls.__name__}, "
          f"{str(merged.dtype).removeprefix('torch.')}); saved to {args.out}"
          + ("" if tokenizer else " (no tokenizer found in BASE)"))
    return 0


# --- quantize --------------------------------------------------------------------------------------------------
def quantize(args: argparse.Namespace) -> int:
    check_output(args.out, args.force, sources=(args.base,))
    model = _load_base(args.base, _auto_class(args.task_type), args.dtype)
    if getattr(model.config, "quantization_config", None) is not None:
        raise UsageError(f"{args.base} is quantized already ({type(model.config.quantization_config).__name__}); "
                         "quantize a 16- or 32-bit model")
    settings = {"quant_type": args.quant_type, "blocksize": args.blocksize, "double_quant": not args.no_double_quant,
                "compute_dtype": args.compute_dtype}
    quantize_model(model, quant_type=args.quant_type, blocksize=args.blocksize, double_quant=settings["double_quant"],
                   compute_dtype=_dtype(args.compute_dtype))
    n4 = sum(isinstance(m, NF4Linear) for m in model.modules())
    if n4 == 0:
        raise CliError(f"{args.base} has no torch.nn.Linear layers to quantize (besides the output head)")
    with staged_output(args.out) as stage:
        save_quantized(model, stage, settings)
        tokenizer = _save_tokenizer(args.base, stage)
    print(f"quantized {n4} linear layers of {args.base} to 4-bit {args.quant_type} (blocksize {args.blocksize}, "
          f"double quant {'on' if settings['double_quant'] else 'off'}); saved to {args.out}"
          + ("" if tokenizer else " (no tokenizer found in BASE)"))
    return 0


def _dense_linears(model: nn.Module) -> list[str]:
    """Layers transformers' bitsandbytes loading would quantize that stayed dense here (the output head, ...)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, Conv1D))]


def save_quantized(model: nn.Module, folder: str, settings: dict) -> None:
    """config.json (+ generation_config.json) and model.safetensors of a `peft_fast.quantize`d model."""
    config = model.config
    compute = settings["compute_dtype"] or str(model.dtype).removeprefix("torch.")
    config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": settings["quant_type"], "bnb_4bit_use_double_quant": settings["double_quant"],
        "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": _dense_linears(model),
    }
    try:
        files.atomic_save_tensors(os.path.join(folder, MODEL_WEIGHTS), model.state_dict(),
                                  metadata={QUANTIZE_KEY: json.dumps(settings)})
        files.atomic_write_text(os.path.join(folder, "config.json"), config.to_json_string())
    finally:
        del config.quantization_config  # the model in memory is not a bitsandbytes model
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def load_quantized(path: str, model_class: Any = None, device: Optional[str] = None) -> nn.Module:
    """Load a 4-bit checkpoint saved by `peft-fast quantize` (or by transformers + bitsandbytes, safetensors)
    as a model with peft_fast NF4Linear layers, without bitsandbytes: the model is built from its config, its
    linear layers are made NF4Linear with the saved settings, and the checkpoint is loaded into them.
    `model_class`: a transformers class (default: config.architectures[0]); `device`: where to put the model."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not isinstance(qc, dict) or not qc.get("load_in_4bit"):
        raise ValueError(f"{path} is not a 4-bit checkpoint (config.json has no 4-bit quantization_config)")
    del config.quantization_config  # build the dense model; the 4-bit layers are peft_fast's
    shards = _shards(path)
    with safe_open(shards[0], framework="pt") as fh:
        saved = json.loads((fh.metadata() or {}).get(QUANTIZE_KEY, "null")) or {}
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, str(arch), None) or transformers.AutoModelForCausalLM
    model = _empty_model(model_class, config)
    for m in model.modules():  # garbage from the uninitialised allocation could be NaN, which quantize refuses
        if type(m) is nn.Linear:
            nn.init.zeros_(m.weight)
    # The blocksize and quant type of each layer come from its own saved quant state; the compute dtype does not.
    compute = saved.get("compute_dtype", qc.get("bnb_4bit_compute_dtype"))
    quantize_model(model, quant_type=qc.get("bnb_4bit_quant_type", "nf4"),
                   double_quant=bool(qc.get("bnb_4bit_use_double_quant")), compute_dtype=_dtype(compute),
                   skip_modules=qc.get("llm_int8_skip_modules") or None)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(files.load_tensors(shard))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:  # tied weights (lm_head = embed_tokens) are saved once by transformers
        model.tie_weights()
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k not in result.missing_keys}
    untied = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {untied[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval() if device else model.eval()


def _shards(path: str) -> list[str]:
    index = os.path.join(path, MODEL_WEIGHTS + ".index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            return sorted({os.path.join(path, f) for f in json.load(fh)["weight_map"].values()})
    if not os.path.isfile(os.path.join(path, MODEL_WEIGHTS)):
        raise files.AdapterFileNotFoundError(f"{path} has no {MODEL_WEIGHTS} (safetensors checkpoints only)")
    return [os.path.join(path, MODEL_WEIGHTS)]


def _empty_model(model_class: Any, config: Any) -> nn.Module:
    """The model without its random init (every weight is loaded afterwards; a 7B init takes minutes)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for the init
        import contextlib

        no_init_weights = contextlib.nullcontext
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    with no_init_weights():
        if hasattr(model_class, "from_config"):
            return model_class.from_config(config, dtype=_dtype(dtype) if isinstance(dtype, str) else dtype)
        return model_class._from_config(config, dtype=_dtype(dtype) if isinstance(dtype, str) else dtype)
