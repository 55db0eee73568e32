"""PeftModel: the user-facing wrapper, with PEFT's API, semantics and files. The adapter type comes from the
config's peft_type, through the tuner registry."""
from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers.utils import PushToHubMixin

from . import files
from .fused.patching import base_class
from .config import CONFIG_NAME, PeftConfig, as_config
from .batching import PREPARE_LOCK, SERVING, changes_adapters, enter_batch, leave_batch
from .loading import convert_v4_layout, init_when_loading, plan_file, read_adapter
from .hub import push_to_hub
from .model_card import write_model_card
from .sharding import check_unsharded, unsharded_only
from .names import check_adapter_name
from .state_dict import get_peft_model_state_dict
from .status import TunerLayerStatus, TunerModelStatus, count_parameters, get_layer_status, get_model_status
from .tuners import injection, registry
from .tuners.file_keys import load_adapter_tensors
from .tuners.lora.conversion import as_plain_lora
from .wrapping import expose_forward_signature, prepare_for_gradient_checkpointing


def _bases() -> tuple[type, ...]:
    """transformers' Trainer, Accelerate and TRL recognise an adapter model by `isinstance(model, peft.PeftModel)`,
    and only then save adapter-only checkpoints, unwrap it, or load the best checkpoint as an adapter. With Hugging
    Face PEFT installed, peft_fast's PeftModel therefore subclasses PEFT's: every method a caller uses is peft_fast's
    own (PEFT's __init__ never runs; its prompt-learning internals stay unused). Without PEFT it is a plain Module
    that can push to the Hub."""
    try:
        from peft import PeftModel as HFPeftModel
    except ImportError:
        return (PushToHubMixin, nn.Module)
    return (HFPeftModel,)


class PeftModel(*_bases()):
    """A model with adapters. ``state_dict`` keys are PEFT's: ``base_model.model.<path>.lora_A.<name>.weight``."""

    _is_prompt_learning = False  # read by PEFT's inherited helpers (model cards, generation) when PEFT is installed
    _head_task: Optional[str] = None  # a task model's: its heads train as modules_to_save for every adapter added

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, *, _plan: Optional[injection.Plan] = None,
                 _tensors: Optional[dict] = None, _source: str = "the adapter", **_ignored: Any):
        nn.Module.__init__(self)
        config = self._with_task_heads(as_config(peft_config)) if _tensors is None else as_config(peft_config)
        self.special_peft_forward_args = {"adapter_names"}
        self._adapters_disabled = False
        tuner_cls = registry.get(config.peft_type).model_cls
        load = {"init": init_when_loading(tuner_cls, config), "plan": _plan, "tensors": _tensors,
                "source": _source} if _tensors is not None else {}
        self.base_model = tuner_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                    **load)
        expose_forward_signature(self)
        prepare_for_gradient_checkpointing(model)

    # --- passthrough -------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def peft_type(self) -> str:
        return next(iter(self.peft_config.values())).peft_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.get_base_model()(*args, **kwargs)
        return self._mixed_forward(adapter_names, args, kwargs)  # unsplatted: traced code never reads the names

    @torch.compiler.disable(recursive=False)
    def _mixed_forward(self, adapter_names: list[str], args: tuple, kwargs: dict) -> Any:
        # Not traced (torch.compile's one graph break of a mixed batch): here the names become the batch plan, so
        # the compiled base model called below sees tensors only, and a new mix reuses its graph.
        with SERVING.serving():
            previous = enter_batch(self.base_model.batch_plan(adapter_names))
            try:
                return self.get_base_model()(*args, **kwargs)
            finally:
                leave_batch(previous)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        with self.base_model.mixed_batch(adapter_names, kwargs.get("num_beams")):
            return self.get_base_model().generate(*args, **kwargs)

    @changes_adapters
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(state_dict, strict, assign)

    # --- adapters ----------------------------------------------------------------------------------------------
    @unsharded_only("add_adapter")
    def add_adapter(self, adapter_name: str, peft_config: Any, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        self.base_model.add_adapter(adapter_name, self._with_task_heads(as_config(peft_config)), autocast_adapter_dtype)

    def _with_task_heads(self, config: PeftConfig) -> PeftConfig:
        """As PEFT's task models do, whatever the config's task_type: a classifier model trains its head in full
        under every adapter (a copy of the config; the caller's is left alone). Loading keeps the file's config."""
        if self._head_task is None:
            return config
        config = copy.copy(config)
        injection.add_task_heads(config, self._head_task)
        return config

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"Adapter {n} not found. Available adapters: {sorted(self.peft_config)}")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    @unsharded_only("delete_adapter")
    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters (LoRA weights and modules_to_save copies) on or off."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    @property
    def has_active_enabled_adapter(self) -> bool:
        return bool(self.active_adapters) and not self._adapters_disabled

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        names = {n for c in self.peft_config.values() for n in (c.modules_to_save or [])}
        return names or None

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the ``with`` block."""
        status = self.get_model_status().enabled
        if status == "irregular":
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all adapters "
                          "will be enabled")
        was_disabled = self._adapters_disabled
        try:
            self.base_model.disable_adapter_layers()
            self._adapters_disabled = True
            yield
        finally:
            if status is not False:
                self.base_model.enable_adapter_layers()
            self._adapters_disabled = was_disabled

    @unsharded_only("merge_adapter")
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    @unsharded_only("unmerge_adapter")
    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    @unsharded_only("merge_and_unload")
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None, dequantize: bool = False) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names, dequantize=dequantize)

    @unsharded_only("unload")
    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # --- bookkeeping -------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' PreTrainedModel.num_parameters (Trainer's FLOPs, loggers' model size), counting 4-bit codes at
        their unpacked size as it does bitsandbytes' (it would count peft_fast's packed code elements)."""
        skip = frozenset(id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)) if exclude_embeddings \
            else frozenset()
        trainable, total = count_parameters(self, skip)
        return trainable if only_trainable else total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def get_layer_status(self) -> list[TunerLayerStatus]:
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        return get_model_status(self)

    # --- files -------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: bool | str = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                        **kwargs: Any) -> None:
        """PEFT's layout: the "default" adapter in ``save_directory``, others in ``save_directory/<name>/``.
        ``save_embedding_layers``: also save the input and output embedding tables, as PEFT: "auto" when an
        embedding layer is a target or the vocabulary was resized since the base model's config.
        ``path_initial_model_for_weight_conversion``: a PiSSA/OLoRA adapter's folder saved at initialisation: the
        adapter is saved as the plain LoRA of rank 2r that gives the trained model from the original base
        (tuners/lora/conversion.py). Unlike PEFT, which rewrites its adapter_config.json, that folder is only read.

        ``state_dict``: take the adapter's values from this full state dict (Accelerate / TRL pass the one they
        gathered from a sharded model) instead of from the parameters. A model sharded by FSDP2 without it: call
        this on every rank (the adapter tensors are gathered, a collective call); the rank with
        ``is_main_process=True`` writes the files."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        state_dict = kwargs.get("state_dict")  # a keyword, as in PEFT (whose positional order this follows)
        names = self._adapters_to_save(selected_adapters)
        if state_dict is not None and not is_main_process:
            return
        # Before the main-process check: gathering sharded tensors needs every rank.
        adapters = {n: get_peft_model_state_dict(self, state_dict, adapter_name=n,
                                                 save_embedding_layers=save_embedding_layers) for n in names}
        if not is_main_process:
            return
        configs = {n: self.peft_config[n] for n in names}
        initial_path = path_initial_model_for_weight_conversion
        if initial_path is not None:  # a PiSSA/OLoRA adapter as plain LoRA of the original base, all before writing
            _, initial, source = read_adapter(str(initial_path), None, False, {})
            for n in names:
                configs[n], adapters[n] = as_plain_lora(configs[n], adapters[n], initial, source)
        for name, tensors in adapters.items():
            out_dir = save_directory if name == "default" else os.path.join(save_directory, name)
            files.clean_temps(out_dir)
            config = copy.deepcopy(configs[name])
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(self.get_base_model(), "name_or_path", None) or \
                    getattr(getattr(self.get_base_model(), "config", None), "_name_or_path", None) or None
            config.inference_mode = True
            text = config.to_json_string(auto_mapping=self._auto_mapping(config))
            # The weights first, carrying the config that follows: an interrupted pair is refused when loaded.
            weights = files.WEIGHTS_NAME if safe_serialization else files.LEGACY_WEIGHTS_NAME
            stale = os.path.join(out_dir, files.LEGACY_WEIGHTS_NAME if safe_serialization else files.WEIGHTS_NAME)
            with files.folder_lock(out_dir):
                # An earlier save in the other format would be read instead of this one (safetensors first) or
                # beside it: PEFT leaves it there, and its loads then return the old weights.
                if os.path.isfile(stale):
                    os.unlink(stale)
                files.atomic_save_tensors(os.path.join(out_dir, weights), tensors, safe_serialization,
                                          metadata={files.CONFIG_KEY: text})
                files.atomic_write_text(os.path.join(out_dir, CONFIG_NAME), text)
        write_model_card(self, save_directory)

    def _adapters_to_save(self, selected_adapters: Optional[list[str]]) -> list[str]:
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for n in names:  # a name is a folder below save_directory: never one that leaves it
            check_adapter_name(n)
        if any(n not in self.peft_config for n in names):
            raise ValueError("You passed an invalid `selected_adapters` arguments, current supported adapter names "
                             f"are {list(self.peft_config.keys())} - got {selected_adapters}.")
        return names

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the adapter files and model card to the Hub repo `repo_id` (created if missing) in one commit;
        keyword arguments: commit_message, commit_description, private, token, revision, create_pr,
        safe_serialization, selected_adapters, tags."""
        return push_to_hub(self, repo_id, **kwargs)

    def _auto_mapping(self, config: PeftConfig) -> Optional[dict]:
        # PEFT records the base model class for task-less adapters, so AutoPeftModel can rebuild the model.
        if config.task_type is not None:
            return None
        cls = base_class(type(self.get_base_model()))  # a fused decoder's class records the class it fuses
        return {"base_model_class": cls.__name__, "parent_library": cls.__module__}

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[Any] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: Optional[dict[str, str]] = None,
                        **kwargs: Any) -> "PeftModel":
        """Load a PEFT-format adapter onto ``model``. On any error ``model`` is left exactly as it was."""
        if isinstance(model, PeftModel):
            raise TypeError("from_pretrained expects the base model; to add an adapter to a PeftModel use "
                            "load_adapter.")
        # ephemeral_gpu_offload and low_cpu_mem_usage change where PEFT stages the tensors, not what is loaded
        kwargs["key_mapping"] = key_mapping
        config, tensors, source = read_adapter(model_id, config, is_trainable, kwargs)
        config, tensors = convert_v4_layout(model, config, tensors, adapter_name)
        tuner_cls = registry.get(config.peft_type).model_cls
        with tuner_cls.preparing(model, config):  # (LoRA's layer_replication: the file's layers exist then)
            tensors, plan = plan_file(model, config, tuner_cls, tensors, source)
            cls = TASK_MODELS.get(config.task_type, cls)  # as PEFT: the file's task type, whatever class was called
            peft_model = cls(model, config, adapter_name, autocast_adapter_dtype, _plan=plan, _tensors=tensors,
                             _source=source)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict[str, str]] = None, **kwargs: Any):
        """Add the adapter saved at ``model_id`` under ``adapter_name`` (or overwrite that adapter's weights).
        ``torch_device``, ``ephemeral_gpu_offload`` and ``low_cpu_mem_usage`` change where PEFT stages the tensors,
        not what is loaded: the adapter's weights go to its layers' devices."""
        check_adapter_name(adapter_name)
        kwargs["key_mapping"] = key_mapping
        model, tuner_cls = self.get_base_model(), type(self.base_model)
        if adapter_name in self.peft_config:
            _, tensors, source = read_adapter(model_id, self.peft_config[adapter_name], is_trainable, kwargs)
            _, tensors = convert_v4_layout(model, self.peft_config[adapter_name], tensors, adapter_name)
            tensors, _ = plan_file(model, self.peft_config[adapter_name], tuner_cls, tensors, source)
            load_adapter_tensors(model, tensors, adapter_name, source)
        else:
            check_unsharded(self, f"load_adapter of a new adapter ({adapter_name!r})")
            config, tensors, source = read_adapter(model_id, None, is_trainable, kwargs)
            config, tensors = convert_v4_layout(model, config, tensors, adapter_name)
            if registry.get(config.peft_type).model_cls is not tuner_cls:
                raise ValueError(f"{model_id} holds a {config.peft_type} adapter; this model's adapters are "
                                 f"{self.peft_type}: load it into its own PeftModel.")
            # (the model's structure may change first: mixed batches in other threads wait, as for add_adapter)
            with SERVING.changing(), PREPARE_LOCK, tuner_cls.preparing(model, config):
                tensors, plan = plan_file(model, config, tuner_cls, tensors, source)
                self.base_model.add_adapter(adapter_name, config, autocast_adapter_dtype,
                                            init=init_when_loading(tuner_cls, config), plan=plan, tensors=tensors,
                                            source=source)
            if is_trainable:
                self.set_requires_grad(adapter_name)
        if not is_trainable:
            self.eval()
        # PEFT returns torch's load result; files that do not fit raise instead, so nothing is ever missing.
        return _IncompatibleKeys([], [])


# PEFT returns one subclass per task type; here they differ in name and in the heads trained in full.
class PeftModelForCausalLM(PeftModel):
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        # As PEFT's: a generation config assigned to this model (Seq2SeqTrainer assigns args.generation_config) is
        # the one generate uses, and the base model keeps it.
        own = self.__dict__.get("generation_config")
        if own is not None:
            self.get_base_model().generation_config = own
        return super().generate(*args, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    _head_task = "SEQ_CLS"


class PeftModelForSeq2SeqLM(PeftModel):
    pass


class PeftModelForTokenClassification(PeftModel):
    _head_task = "TOKEN_CLS"


class PeftModelForQuestionAnswering(PeftModel):
    _head_task = "QUESTION_ANS"


class PeftModelForFeatureExtraction(PeftModel):
    pass


TASK_MODELS = {
    "CAUSAL_LM": PeftModelForCausalLM, "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM, "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering, "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}
