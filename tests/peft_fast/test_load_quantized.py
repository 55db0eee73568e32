"""save_quantized / load_quantized refusals: a dense checkpoint, a checkpoint with tensors the model lacks, and the
in-memory model's config left as it was by a save (the 4-bit quantization_config goes to the file only)."""
import json
import warnings

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import base_model, peft_fast_only

import peft_fast
from peft_fast.bases.checkpoint import save_quantized

pytestmark = peft_fast_only
SETTINGS = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": None}


def _quantized():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_fast.quantize(base_model("llama"))


def test_a_save_leaves_the_models_config_alone(tmp_path):
    model = _quantized()
    save_quantized(model, str(tmp_path), SETTINGS)
    assert getattr(model.config, "quantization_config", None) is None  # the model in memory is not a bnb model
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["load_in_4bit"]


def test_a_checkpoint_with_a_tensor_the_model_lacks_is_refused_naming_it(tmp_path):
    save_quantized(_quantized(), str(tmp_path), SETTINGS)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(path)
    tensors["model.layers.1.mlp.zz_proj.weight"] = next(iter(tensors.values())).clone()
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match="does not fit LlamaForCausalLM: .*zz_proj"):
        peft_fast.load_quantized(str(tmp_path))


def test_a_dense_checkpoint_is_refused(tmp_path):
    base_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a 4-bit checkpoint"):
        peft_fast.load_quantized(str(tmp_path))
