"""PEFT's AutoPeftModel classes: load an adapter folder (or Hub repo) together with the base model its config names,
through the transformers Auto class of its task (or, for task-less adapters, the class recorded in the config's
`auto_mapping`), onto peft_fast's PeftModel."""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Optional

from . import files
from .config import CONFIG_NAME, PeftConfig
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

# Libraries an adapter's auto_mapping may import a base model class from without the caller's say-so (as PEFT).
DEFAULT_IMPORT_ALLOWLIST = ("transformers", "diffusers", "timm")
_HUB_KEYS = ("revision", "token", "cache_dir", "subfolder", "local_files_only")


class _BaseAutoPeftModel:
    _target_class: Optional[str] = None  # the transformers Auto class, by name
    _target_peft_class: type = PeftModel
    _task_type: Optional[str] = None

    def __init__(self, *args: Any, **kwargs: Any):
        raise EnvironmentError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(path).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[Any] = None, revision: Optional[str] = None,
                        import_allowlist: Optional[list[str]] = None, **kwargs: Any) -> PeftModel:
        """Load the base model named by the adapter's config (keyword arguments such as `dtype`, `device_map`,
        `quantization_config` go to the base model's from_pretrained, the Hub ones to both), then the adapter."""
        hub = {k: kwargs[k] for k in _HUB_KEYS if k in kwargs}
        if revision is not None:
            hub["revision"] = revision
        subfolder = hub.pop("subfolder", None)
        config_path = files.resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub)
        peft_config = PeftConfig.from_json_file(config_path)
        target = cls._base_class(peft_config, config_path, import_allowlist)
        if not peft_config.base_model_name_or_path:
            raise ValueError(f"{config_path} names no base model (base_model_name_or_path is empty): load the base "
                             f"model yourself and use PeftModel.from_pretrained(base, {pretrained_model_name_or_path!r}).")
        base_kwargs = {k: v for k, v in kwargs.items() if k not in ("subfolder",)}
        base_kwargs.pop("revision", None)
        base = target.from_pretrained(peft_config.base_model_name_or_path, revision=peft_config.revision,
                                      **base_kwargs)
        _resize_for_tokenizer(base, pretrained_model_name_or_path, kwargs)
        extra = {"subfolder": subfolder} if subfolder else {}
        if kwargs.get("key_mapping"):  # as PEFT: to the base model's from_pretrained and to the adapter's
            extra["key_mapping"] = kwargs["key_mapping"]
        return cls._target_peft_class.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                                      is_trainable=is_trainable, config=config, **hub, **extra)

    @classmethod
    def _base_class(cls, peft_config: PeftConfig, config_path: str, import_allowlist: Optional[list[str]]):
        task = peft_config.task_type
        if cls._target_class is None and task is not None:
            raise ValueError(f"Cannot use AutoPeftModel with a task type ({task}): use the class for the task, e.g. "
                             "AutoPeftModelForCausalLM for task_type='CAUSAL_LM'.")
        if task is not None and task != cls._task_type:
            wanted = next(c for c in _AUTO_CLASSES if c._task_type == task)
            raise ValueError(f"This adapter's task_type is {task}: load it with {wanted.__name__}, not "
                             f"{cls.__name__}.")
        if cls._target_class is not None:
            return getattr(importlib.import_module("transformers"), cls._target_class)
        with open(config_path, encoding="utf-8") as fh:
            mapping = json.load(fh).get("auto_mapping") or {}
        if not mapping.get("base_model_class") or not mapping.get("parent_library"):
            raise ValueError(f"{config_path} has neither a task_type nor an auto_mapping naming the base model class: "
                             "use the AutoPeftModelFor<Task> class of the adapter's task, or load the base model "
                             "yourself and use PeftModel.from_pretrained.")
        library = mapping["parent_library"]
        allowed = DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None else tuple(import_allowlist)
        if library.split(".")[0] not in allowed:
            raise ValueError(f"The adapter's auto_mapping wants to import {library!r}, which is not in the import "
                             f"allowlist {list(allowed)}; if importing it is safe, pass "
                             f"import_allowlist=[{library.split('.')[0]!r}].")
        return getattr(importlib.import_module(library), mapping["base_model_class"])


def _resize_for_tokenizer(base, adapter_path: str, kwargs: dict) -> None:
    """As PEFT: a tokenizer saved with the adapter that has more tokens than the base's embedding grows it."""
    if not os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json")) or \
            not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_path, trust_remote_code=kwargs.get("trust_remote_code", False))
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


def _auto(name: str, target: Optional[str], peft_cls: type, task: Optional[str]) -> type:
    doc = f"Load an adapter and its base model ({target or 'the class in the adapter config'}) as {peft_cls.__name__}."
    return type(name, (_BaseAutoPeftModel,), {"_target_class": target, "_target_peft_class": peft_cls,
                                              "_task_type": task, "__doc__": doc, "__module__": __name__})


AutoPeftModel = _auto("AutoPeftModel", None, PeftModel, None)
AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "AutoModelForCausalLM", PeftModelForCausalLM,
                                 "CAUSAL_LM")
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", PeftModelForSeq2SeqLM,
                                  "SEQ_2_SEQ_LM")
AutoPeftModelForSequenceClassification = _auto("AutoPeftModelForSequenceClassification",
                                               "AutoModelForSequenceClassification",
                                               PeftModelForSequenceClassification, "SEQ_CLS")
AutoPeftModelForTokenClassification = _auto("AutoPeftModelForTokenClassification", "AutoModelForTokenClassification",
                                            PeftModelForTokenClassification, "TOKEN_CLS")
AutoPeftModelForQuestionAnswering = _auto("AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering",
                                          PeftModelForQuestionAnswering, "QUESTION_ANS")
AutoPeftModelForFeatureExtraction = _auto("AutoPeftModelForFeatureExtraction", "AutoModel",
                                          PeftModelForFeatureExtraction, "FEATURE_EXTRACTION")
_AUTO_CLASSES = (AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
                 AutoPeftModelForTokenClassification, AutoPeftModelForQuestionAnswering,
                 AutoPeftModelForFeatureExtraction)
# PEFT's task types -> the transformers Auto class that loads a base model for them.
AUTO_CLASS_FOR_TASK = {cls._task_type: cls._target_class for cls in _AUTO_CLASSES}
