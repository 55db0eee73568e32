"""`peft-fast merge` and `peft-fast quantize`, which load whole models with transformers; the quantized checkpoint
format and `load_quantized` live in bases/checkpoint.py."""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from .auto import AUTO_CLASS_FOR_TASK
from .bases.checkpoint import _dtype, save_quantized
from .bases.nf4_experts import is_nf4_experts
from .bases.nf4_linear import NF4Linear
from .bases.quantize import quantize as quantize_model
from . import files
from .cli_common import CliError, UsageError, check_output, staged_output, weights_file
from .config import CONFIG_NAME
from .names import check_adapter_name
from .peft_model import PeftModel


def _auto_class(task_type: Optional[str], auto_mapping: Optional[dict] = None):
    import transformers

    if task_type is None and auto_mapping and hasattr(transformers, str(auto_mapping.get("base_model_class"))):
        return getattr(transformers, auto_mapping["base_model_class"])  # PEFT records it for task-less adapters
    return getattr(transformers, AUTO_CLASS_FOR_TASK.get(task_type or "CAUSAL_LM", "AutoModelForCausalLM"))


def _load_base(base: str, cls, dtype: Optional[str]):
    if not os.path.isdir(base) and (os.path.exists(base) or base.startswith((".", "/", "~"))):
        raise UsageError(f"{base}: no such model folder")
    try:
        return cls.from_pretrained(base, dtype=_dtype(dtype))
    except OSError as exc:  # transformers' own message says what is missing; say where it looked
        where = "" if os.path.isdir(base) else " (not a local folder, so it was looked up on the Hugging Face Hub)"
        raise CliError(f"cannot load the model {base}{where}: {exc}") from None


def _save_tokenizer(sources: tuple[str, ...], out: str) -> bool:
    """The first tokenizer found in `sources` (an adapter folder holding the tokenizer its added tokens came with,
    then the base), best effort: a model without one (or one transformers cannot read) is saved without one."""
    from transformers import AutoTokenizer

    for source in sources:
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(out)
            return True
        except Exception:  # no tokenizer there (or an unreadable one): try the next source
            continue
    return False


def _saved_vocab(folder: str, model) -> Optional[int]:
    """Rows of the input embedding's table saved with the adapter (PEFT's save_embedding_layers, as after
    resize_token_embeddings for added tokens), when they differ from the model's; None otherwise."""
    path = weights_file(folder)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((k for k, m in model.named_modules() if m is embedding), None) if embedding is not None else None
    if name is None or path is None:
        return None
    prefix = f"base_model.model.{name}."
    for key, shape in _shapes(path).items():
        rest = key[len(prefix):] if key.startswith(prefix) else ""
        if rest.endswith("weight") and "lora_" not in rest:
            if len(shape) == 2 and shape[1] == embedding.embedding_dim and shape[0] != embedding.num_embeddings:
                return int(shape[0])
    return None


def _shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weights file: the safetensors header alone, or a .bin file read whole (adapter-sized)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    return {k: tuple(v.shape) for k, v in files.load_tensors(path).items()}


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
    check_output(args.out, args.force, sources=(args.dir, args.base))
    with open(config_path, encoding="utf-8") as fh:
        raw = json.load(fh)
    cls = _auto_class(args.task_type or raw.get("task_type"), raw.get("auto_mapping"))
    model = _load_base(args.base, cls, args.dtype)
    vocab = _saved_vocab(folder, model)
    if vocab is not None:  # the adapter was trained with added tokens: its tables replace the resized ones
        model.resize_token_embeddings(vocab)
    peft_model = PeftModel.from_pretrained(model, args.dir, subfolder=sub)
    merged = peft_model.merge_and_unload(safe_merge=args.safe)
    with staged_output(args.out) as stage:
        merged.save_pretrained(stage)
        tokenizer = _save_tokenizer((folder, args.dir, args.base), stage)
    print(f"merged adapter {args.adapter_name!r} of {args.dir} into {args.base} ({cls.__name__}, "
          f"{str(merged.dtype).removeprefix('torch.')}" + (f", vocabulary resized to {vocab}" if vocab else "")
          + f"); saved to {args.out}" + ("" if tokenizer else " (no tokenizer found in DIR or BASE)"))
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
                   compute_dtype=_dtype(args.compute_dtype), experts=not args.dense_experts,
                   quant_storage=_dtype(args.quant_storage))
    n4 = sum(isinstance(m, NF4Linear) for m in model.modules())
    if n4 == 0:
        raise CliError(f"{args.base} has no torch.nn.Linear layers to quantize (besides the output head)")
    with staged_output(args.out) as stage:
        save_quantized(model, stage, settings)
        tokenizer = _save_tokenizer((args.base,), stage)
    stacks = sum(is_nf4_experts(m) for m in model.modules())
    print(f"quantized {n4} linear layers" + (f" and {stacks} experts modules" if stacks else "") +
          f" of {args.base} to 4-bit {args.quant_type} (blocksize {args.blocksize}, "
          f"double quant {'on' if settings['double_quant'] else 'off'}); saved to {args.out}"
          + ("" if tokenizer else " (no tokenizer found in BASE)"))
    return 0


