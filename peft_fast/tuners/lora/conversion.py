"""A PiSSA or OLoRA adapter saved as a plain LoRA adapter of the original base model (PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)`).

PiSSA and OLoRA move part of the base weight into the adapter: W = W_res + B0·A0 at initialisation, and the trained
model is W_res + B·A. Its change against the original W is ΔW = B·A - B0·A0 = [B | -B0]·[A ; A0], a LoRA of rank 2r
whose scaling is kept by doubling alpha (by √2 under rsLoRA). The initial adapter comes from a folder saved right
after get_peft_model (PEFT's guide sets init_lora_weights=True first, which only its loading needs).
"""
from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch

# The factors' file keys: a linear or conv layer's `lora_A.weight`, an embedding's `lora_embedding_A` (no `.weight`)
_A = re.compile(r"\.(lora_A\.weight|lora_embedding_A)$")
_B = re.compile(r"\.(lora_B\.weight|lora_embedding_B)$")


def as_plain_lora(config: Any, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                  source: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config, tensors) of the plain LoRA adapter equal to the trained one (`config`, `tensors`) on the original
    base; `initial`: the tensors of the adapter saved at initialisation (read from `source`, never loaded into a
    model, so its saved init_lora_weights does not matter)."""
    if config.peft_type != "LORA":
        raise ValueError(f"path_initial_model_for_weight_conversion converts PiSSA/OLoRA LoRA adapters; this one is "
                         f"{config.peft_type}.")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    if getattr(config, "target_parameters", None):  # expert stacks hold every expert's factors in one tensor
        raise ValueError("path_initial_model_for_weight_conversion does not convert target_parameters adapters: "
                         "their factors stack the experts, which a concatenation of whole tensors would mix.")
    if config.use_dora or config.lora_bias:  # PEFT would drop the magnitudes, and fail on a bias
        raise ValueError("path_initial_model_for_weight_conversion converts plain LoRA factors; an adapter with "
                         f"{'use_dora' if config.use_dora else 'lora_bias'}=True has parts a difference of products "
                         "cannot express.")
    if not str(config.init_lora_weights).lower().startswith(("pissa", "olora", "true")):
        warnings.warn("`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/"
                      "LoRA-GA adapter to a LoRA adapter", stacklevel=3)
    out = {}
    for key, value in tensors.items():
        dim = 0 if _A.search(key) else 1 if _B.search(key) else None
        if dim is None and key.endswith(".base_layer.weight"):  # an adapted table saved with it: the residual, not
            continue  # W (PEFT too); a trained bias (bias="lora_only"/"all") is kept: PiSSA leaves biases alone
        if dim is None:  # modules_to_save copies, trainable tokens: the same on either base
            out[key] = value
            continue
        start = initial.get(key)
        if start is None or start.shape != value.shape:
            raise ValueError(f"{source} does not hold the initial value of {key} (shape {tuple(value.shape)}): is it "
                             "this adapter, saved right after get_peft_model?")
        start = start.to(value.device, value.dtype)
        out[key] = torch.cat([value, start if dim == 0 else -start], dim=dim).contiguous()
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= 2 ** 0.5 if config.use_rslora else 2
    config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    return config, out
