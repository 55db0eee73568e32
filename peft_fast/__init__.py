"""peft_fast: Triton-accelerated adapters with Hugging Face PEFT's API and file format.

Switch from PEFT by changing the import: ``from peft_fast import LoraConfig, get_peft_model, PeftModel``.
"""
from .version import __version__  # noqa: F401

from .bases import NF4Linear  # noqa: E402
from .bases.checkpoint import load_quantized, save_quantized  # noqa: E402
from .bases.kbit import prepare_model_for_kbit_training  # noqa: E402
from .bases.quantize import quantize  # noqa: E402
from .auto import (  # noqa: E402
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig  # noqa: E402
from .enums import PeftType, TaskType  # noqa: E402
from .functional import get_peft_config, inject_adapter_in_model, load_peft_weights  # noqa: E402
from .peft_model import (  # noqa: E402
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .mapping import get_peft_model, patch  # noqa: E402
from .fused import fuse, fused_parts, unfuse  # noqa: E402
from .offload import offload_checkpoints, offloaded_scopes  # noqa: E402
from .peft_interop import patch_peft, patched_layers, unpatch  # noqa: E402
from .mixed_precision import cast_mixed_precision_params  # noqa: E402
from .state_dict import (get_base_model_state_dict, get_peft_model_state_dict,  # noqa: E402
                         set_base_model_state_dict, set_peft_model_state_dict)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status  # noqa: E402
from .tuners.adalora import AdaLoraConfig, AdaLoraLayer, AdaLoraModel  # noqa: E402  (registers AdaLoRA)
from .tuners.ia3 import IA3Config, IA3Linear, IA3Model  # noqa: E402  (registers IA3)
from .tuners.loha import LoHaConfig, LoHaLayer, LoHaModel  # noqa: E402  (registers LoHa)
from .tuners.lokr import LoKrConfig, LoKrLayer, LoKrModel  # noqa: E402  (registers LoKr)
from .tuners.lora import (  # noqa: E402  (registers LoRA, the default type)
    LoraConfig, LoraConv1d, LoraConv2d, LoraConv3d, LoraEmbedding, LoraLinear, LoraModel, LoraRuntimeConfig,
)
from .tuners.oft import OFTConfig, OFTLayer, OFTModel  # noqa: E402  (registers OFT)
from .tuners.vera import VeraConfig, VeraLinear, VeraModel  # noqa: E402  (registers VeRA)
from .tuners.lora.hotswap import (  # noqa: E402
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
from .tuners.merge_utils import (  # noqa: E402
    calculate_majority_sign_mask,
    dare_linear,
    dare_ties,
    disjoint_merge,
    magnitude_prune,
    prune,
    task_arithmetic,
    ties,
)
from .tuners.merging import QuantizedMergeWarning  # noqa: E402
from .tuners.modules_to_save import ModulesToSaveWrapper  # noqa: E402
from .tuners.trainable_tokens import TrainableTokensWrapper  # noqa: E402
from .tuners.targets import NoMatchingPeftModuleError  # noqa: E402

__all__ = [
    "LoraConfig", "LoraRuntimeConfig", "PeftConfig", "LoraLinear", "LoraEmbedding", "LoraConv1d", "LoraConv2d",
    "LoraConv3d", "LoraModel",
    "LoHaConfig", "LoHaLayer", "LoHaModel", "LoKrConfig", "LoKrLayer", "LoKrModel", "AdaLoraConfig", "AdaLoraLayer",
    "AdaLoraModel", "OFTConfig", "OFTLayer", "OFTModel", "IA3Config", "IA3Linear", "IA3Model", "VeraConfig",
    "VeraLinear", "VeraModel", "ModulesToSaveWrapper", "TrainableTokensWrapper", "NoMatchingPeftModuleError",
    "PeftModel", "PeftModelForCausalLM", "PeftType",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "QuantizedMergeWarning", "TaskType",
    "TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status", "get_peft_model",
    "get_peft_model_state_dict", "patch", "set_peft_model_state_dict", "get_base_model_state_dict",
    "set_base_model_state_dict", "cast_mixed_precision_params",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "get_peft_config", "inject_adapter_in_model", "load_peft_weights",
    # speeding up Hugging Face PEFT models in place
    "patch_peft", "patched_layers", "unpatch",
    # task-vector merging (PEFT's peft.utils.merge_utils)
    "calculate_majority_sign_mask", "dare_linear", "dare_ties", "disjoint_merge", "magnitude_prune", "prune",
    "task_arithmetic", "ties",
    # hot-swapping adapters without recompiling (PEFT's peft.utils.hotswap)
    "hotswap_adapter", "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap",
    # preparing a quantized model for training (PEFT's peft.utils.other)
    "prepare_model_for_kbit_training",
    # 4-bit NF4 base models without bitsandbytes
    "NF4Linear", "load_quantized", "quantize", "save_quantized",
    # the fused decoder (RMSNorm, RoPE, SwiGLU/GeGLU, the loss without logits) through Liger-Kernel or torch.compile
    "fuse", "fused_parts", "unfuse",
    # gradient checkpointing whose saved layer inputs wait in pinned host memory
    "offload_checkpoints", "offloaded_scopes",
]
