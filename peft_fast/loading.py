"""Reading a saved adapter (a local folder or a Hub repo): its config, by its peft_type, and its tensors."""
from __future__ import annotations

import copy
from typing import Any, Optional

from . import files
from .config import CONFIG_NAME, PeftConfig, as_config


def read_adapter(model_id: str, config: Optional[Any], is_trainable: bool, kwargs: dict):
    """(config, tensors, path of the weights file); `config` overrides the saved one. Nothing is touched. A saved
    config that disagrees with the one saved inside the weights (an interrupted save) is refused; a caller who
    brings the config takes responsibility for it."""
    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "subfolder", "local_files_only") if k in kwargs}
    subfolder = hub.pop("subfolder", None)
    if config is None:
        config_path = files.resolve_file(model_id, CONFIG_NAME, subfolder=subfolder, **hub)
        config = PeftConfig.from_json_file(config_path)
        path = files.find_weights(model_id, subfolder=subfolder, **hub)
        files.check_pair(config_path, path)
    else:
        config = copy.deepcopy(as_config(config))
        path = files.find_weights(model_id, subfolder=subfolder, **hub)
    config.inference_mode = not is_trainable
    return config, files.load_tensors(path), path
