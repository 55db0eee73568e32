"""PEFT's `PeftType` and `TaskType`: string enums, so that `config.peft_type == PeftType.LORA` and
`task_type=TaskType.CAUSAL_LM` work as in PEFT, and their members equal the plain strings that configs and files
hold. PeftType names every adapter type PEFT knows (so code written against PEFT imports); peft_fast implements the
ones in its tuner registry (`peft_fast.tuners.registry.known()`), and a config of another type is refused by name."""
from __future__ import annotations

import enum


PeftType = enum.Enum("PeftType", {name: name for name in (
    "PROMPT_TUNING MULTITASK_PROMPT_TUNING P_TUNING PREFIX_TUNING LORA ADALORA ADAMSS BOFT ADAPTION_PROMPT IA3 BEFT "
    "LILY LOHA LOKR OFT POLY LN_TUNING VERA FROD PVERA FOURIERFT GLORA XLORA HRA VBLORA UNILORA CPT MISS RANDLORA "
    "ROAD TRAINABLE_TOKENS HIRA SHIRA C3A WAVEFT OSF DELORA GRALORA CARTRIDGE TINYLORA PSOFT PEANUT SHADOW "
    "SUPERTUNING DEFT").split()}, module=__name__, type=str)

TaskType = enum.Enum("TaskType", {name: name for name in (
    "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")}, module=__name__,
    type=str)

TASK_TYPES = tuple(t.value for t in TaskType)
