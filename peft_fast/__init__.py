"""peft_fast: Triton-accelerated LoRA with Hugging Face PEFT's API and file format.

Switch from PEFT by changing the import: ``from peft_fast import LoraConfig, get_peft_model, PeftModel``.
"""
__version__ = "0.1.0"

from .config import LoraConfig, PeftConfig  # noqa: E402
from .hotswap import (  # noqa: E402
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
from .kbit import prepare_model_for_kbit_training  # noqa: E402
from .layer import LoraLinear  # noqa: E402
from .merge_utils import (  # noqa: E402
    calculate_majority_sign_mask,
    dare_linear,
    dare_ties,
    disjoint_merge,
    magnitude_prune,
    prune,
    task_arithmetic,
    ties,
)
from .modules_to_save import ModulesToSaveWrapper  # noqa: E402
from .nf4_linear import NF4Linear  # noqa: E402
from .peft_model import (  # noqa: E402
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    patch,
)
from .state_dict import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from .quantize import quantize  # noqa: E402
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status  # noqa: E402
from .targets import NoMatchingPeftModuleError  # noqa: E402
from .tuner import LoraModel  # noqa: E402

TaskType = type("TaskType", (), {t: t for t in ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS",
                                                 "QUESTION_ANS", "FEATURE_EXTRACTION")})

__all__ = [
    "LoraConfig", "PeftConfig", "LoraLinear", "LoraModel", "ModulesToSaveWrapper", "NoMatchingPeftModuleError",
    "PeftModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "TaskType", "TunerLayerStatus",
    "TunerModelStatus", "get_layer_status", "get_model_status", "get_peft_model", "get_peft_model_state_dict",
    "patch", "set_peft_model_state_dict",
    # task-vector merging (PEFT's peft.utils.merge_utils)
    "calculate_majority_sign_mask", "dare_linear", "dare_ties", "disjoint_merge", "magnitude_prune", "prune",
    "task_arithmetic", "ties",
    # hot-swapping adapters without recompiling (PEFT's peft.utils.hotswap)
    "hotswap_adapter", "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap",
    # preparing a quantized model for training (PEFT's peft.utils.other)
    "prepare_model_for_kbit_training",
    # 4-bit NF4 base models without bitsandbytes
    "NF4Linear", "quantize",
]
