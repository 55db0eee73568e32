"""Reading a saved adapter (a local folder or a Hub repo): its config, by its peft_type, and its tensors."""
from __future__ import annotations

import copy
from typing import Any, Optional

from . import files
from .config import PeftConfig, as_config


def read_adapter(model_id: str, config: Optional[Any], is_trainable: bool, kwargs: dict):
    """(config, tensors, path of the weights file); `config` overrides the saved one. Nothing is touched."""
    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "subfolder", "local_files_only") if k in kwargs}
    subfolder = hub.pop("subfolder", None)
    if config is None:
        config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub)
    else:
        config = copy.deepcopy(as_config(config))
    config.inference_mode = not is_trainable
    path = files.find_weights(model_id, subfolder=subfolder, **hub)
    return config, files.load_tensors(path), path
