"""The model card (README.md) that save_pretrained writes beside the adapter, as PEFT writes it: the Hub reads
`library_name: peft`, the base model, tags and (for causal LMs) the pipeline tag from its metadata. An existing
card is updated, not replaced; the framework line names peft_fast and the PEFT format it writes."""
from __future__ import annotations

import dataclasses
import os

import torch.nn as nn
from transformers import PreTrainedModel

from .files import atomic_write_text
from .tuners import registry
from .version import __version__

FRAMEWORK_HEADING = "### Framework versions"
TRAINING_HEADING = "## Training procedure"
QUANTIZATION_PREFIX = "The following `bitsandbytes` quantization config was used during training:"


def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config if isinstance(config, dict) else None


def _tags(peft_model) -> set[str]:
    base = peft_model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or [])
    if isinstance(base, PreTrainedModel):
        tags.add("transformers")
    card_tag = registry.get(peft_model.peft_type).card_tag  # one tuner per model (none may be active)
    if card_tag:
        tags.add(card_tag)
    name = getattr(base, "name_or_path", None)
    if name is not None:
        tags.add(f"base_model:adapter:{name}")
    return tags


def write_model_card(peft_model, directory: str) -> None:
    """Create or update `directory`/README.md for `peft_model` (atomically)."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = _tags(peft_model)
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and type(peft_model).__name__ == "PeftModelForCausalLM":
        card.data.pipeline_tag = "text-generation"
    config = _model_config(peft_model.get_base_model())
    if config is not None and "_name_or_path" in config:  # as PEFT: an empty name too (a model built from a config)
        card.data["base_model"] = config["_name_or_path"]
    lines = card.text.splitlines()
    quantization = (config or {}).get("quantization_config")
    if isinstance(quantization, dict) and QUANTIZATION_PREFIX not in lines:
        text = f"\n{QUANTIZATION_PREFIX}\n" + "\n".join(f"- {k}: {v}" for k, v in quantization.items()) + "\n"
        if TRAINING_HEADING in lines:
            lines.insert(lines.index(TRAINING_HEADING) + 2, text)
        else:
            lines.append(f"{TRAINING_HEADING}\n{text}")
    line = f"- PEFT (adapter format), written by peft_fast {__version__}"
    if line not in lines:
        if FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(FRAMEWORK_HEADING) + 2, line)
        else:
            lines.append(f"{FRAMEWORK_HEADING}\n\n{line}")
    card.text = "\n".join(lines)
    atomic_write_text(path, str(card))
