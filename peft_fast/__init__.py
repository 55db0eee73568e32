"""peft_fast: Triton-accelerated LoRA with Hugging Face PEFT's API and file format.

Switch from PEFT by changing the import: ``from peft_fast import LoraConfig, get_peft_model, PeftModel``.
"""
__version__ = "0.1.0"

from .config import LoraConfig, PeftConfig  # noqa: E402
from .layer import LoraLinear  # noqa: E402
from .modules_to_save import ModulesToSaveWrapper  # noqa: E402
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
]
