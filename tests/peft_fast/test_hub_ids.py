"""A name that is not a local folder is treated as a Hugging Face Hub repo id (no network here: the download
function is replaced by one that serves a local folder, so the real code path up to the download runs)."""
import shutil

import pytest
import torch
from tiny_models import AGAINST_PEFT

import peft_fast

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast-only code path")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def test_from_pretrained_with_a_hub_id(tmp_path, monkeypatch):
    saved = peft_fast.get_peft_model(_mlp(), peft_fast.LoraConfig(r=2, target_modules=["0", "2"],
                                                                  init_lora_weights=False))
    saved.save_pretrained(tmp_path / "repo")
    asked = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        asked.append((repo_id, filename, subfolder, kwargs.get("revision")))
        target = tmp_path / "cache" / filename
        target.parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "repo" / filename, target)
        return str(target)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = peft_fast.PeftModel.from_pretrained(_mlp(), "someone/tiny-adapter", revision="v1")
    assert {a[:2] for a in asked} == {("someone/tiny-adapter", "adapter_config.json"),
                                      ("someone/tiny-adapter", "adapter_model.safetensors")}
    assert all(a[3] == "v1" for a in asked)
    x = torch.randn(3, 6)
    torch.testing.assert_close(loaded(x), saved(x), rtol=0, atol=0)


def test_hub_failure_is_a_clear_error_and_changes_nothing(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    base = _mlp()
    with pytest.raises(ValueError, match="someone/missing"):
        peft_fast.PeftModel.from_pretrained(base, "someone/missing")
    assert type(base[0]) is torch.nn.Linear

