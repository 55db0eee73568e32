"""The model card save_pretrained writes (as PEFT's), push_to_hub against a mocked Hub API (nothing leaves the
machine), and progress bars where PEFT shows them."""
import os
import types
import warnings

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForCausalLM

import peft_fast
from tiny_models import AGAINST_PEFT, base_model, default_cfg, impl, make_pair, ref


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    base_model("llama").save_pretrained(path)
    return path


def _pair_from(base_dir, **cfg):
    models = []
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.append(lib.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                              lib.LoraConfig(**default_cfg("llama", **cfg))))
    return models


@pytest.mark.parametrize("task", ["CAUSAL_LM", None])
def test_model_card_metadata_is_peft_s(base_dir, tmp_path, task):
    ref_model, impl_model = _pair_from(base_dir, task_type=task)
    ref_model.save_pretrained(tmp_path / "ref")
    impl_model.save_pretrained(tmp_path / "impl")
    r, i = (ModelCard.load(tmp_path / d / "README.md") for d in ("ref", "impl"))
    assert i.data.to_dict() == r.data.to_dict()
    assert i.data.library_name == "peft" and i.data.base_model == str(base_dir)
    assert (i.data.pipeline_tag == "text-generation") == (task == "CAUSAL_LM")
    assert "### Framework versions" in i.text


def test_model_card_of_a_model_built_from_a_config_is_peft_s(tmp_path):
    """No name to record: PEFT still writes the empty `base_model`, and so does peft_fast."""
    _, r, i = make_pair("llama")
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    cards = [ModelCard.load(tmp_path / d / "README.md") for d in ("ref", "impl")]
    assert cards[1].data.to_dict() == cards[0].data.to_dict()
    assert cards[1].data.to_dict()["base_model"] == ""


def test_model_card_updates_an_existing_card(tmp_path):
    _, _, model = make_pair("mlp")
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nTrained on my data.\n")
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # twice: the framework line is not repeated
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "peft"
    assert "Trained on my data." in card.text
    assert card.text.count("### Framework versions") == 1


class _FakeHub:
    """HfApi's methods that push_to_hub calls, recording what they were given; `card` is the repo's README."""

    def __init__(self, monkeypatch, card=None, tmp=None):
        self.calls, self.uploaded = [], {}

        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))
            return types.SimpleNamespace(repo_id=f"me/{repo_id}" if "/" not in repo_id else repo_id)

        def create_branch(api, **kw):
            self.calls.append(("create_branch", kw))

        def hf_hub_download(api, repo_id, filename, **kw):
            if card is None:
                raise EntryNotFoundError(f"{filename} not in {repo_id}")
            path = tmp / "remote_README.md"
            path.write_text(card)
            return str(path)

        def upload_folder(api, *, repo_id, folder_path, **kw):
            self.calls.append(("upload_folder", repo_id, kw))
            for root, _, names in os.walk(folder_path):
                for n in names:
                    full = os.path.join(root, n)
                    self.uploaded[os.path.relpath(full, folder_path)] = open(full, "rb").read()
            return "commit-info"

        for name, fn in [("create_repo", create_repo), ("create_branch", create_branch),
                         ("hf_hub_download", hf_hub_download), ("upload_folder", upload_folder)]:
            monkeypatch.setattr(HfApi, name, fn)


@pytest.mark.skipif(AGAINST_PEFT, reason="PEFT's push_to_hub is transformers' generic one (it replaces the card)")
def test_push_to_hub_uploads_the_adapter_and_its_card(monkeypatch, tmp_path):
    hub = _FakeHub(monkeypatch)
    _, _, model = make_pair("llama")
    model.add_adapter("other", peft_fast.LoraConfig(**default_cfg("llama", r=2)))
    assert model.push_to_hub("my-adapter", private=True, token="t", tags=["mine"]) == "commit-info"
    assert hub.calls[0] == ("create_repo", "my-adapter", {"private": True, "token": "t", "exist_ok": True})
    kind, repo, kw = hub.calls[-1]
    assert (kind, repo, kw["commit_message"], kw["token"]) == ("upload_folder", "me/my-adapter", "Upload adapter", "t")
    assert set(hub.uploaded) == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                 os.path.join("other", "adapter_config.json"),
                                 os.path.join("other", "adapter_model.safetensors")}
    (tmp_path / "README.md").write_bytes(hub.uploaded["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and "mine" in card.data.tags and "lora" in card.data.tags
    # the upload loads back in PEFT
    for name, data in hub.uploaded.items():
        (tmp_path / "up" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "up" / name).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = ref.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / "up"))
    assert set(loaded.peft_config) == {"default"}


@pytest.mark.skipif(AGAINST_PEFT, reason="PEFT's push_to_hub is transformers' generic one (it replaces the card)")
def test_push_to_hub_keeps_the_repo_card_and_pushes_to_a_branch(monkeypatch, tmp_path):
    hub = _FakeHub(monkeypatch, card="---\nlicense: mit\n---\n# Kept text\n", tmp=tmp_path)
    _, _, model = make_pair("mlp")
    model.push_to_hub("org/repo", revision="dev", selected_adapters=["default"], commit_message="v2")
    assert ("create_branch", {"repo_id": "org/repo", "branch": "dev", "token": None, "exist_ok": True}) in hub.calls
    assert hub.calls[-1][2]["revision"] == "dev" and hub.calls[-1][2]["commit_message"] == "v2"
    text = hub.uploaded["README.md"].decode()
    assert "# Kept text" in text and "library_name: peft" in text and "license: mit" in text


@pytest.mark.skipif(AGAINST_PEFT, reason="PEFT's push_to_hub is transformers' generic one")
def test_push_to_hub_refusals_upload_nothing(monkeypatch, tmp_path):
    """A bad selection is refused before the repo is created; a README that cannot be read for another reason than
    its absence (here: no access) stops the push, rather than replacing the repo's card with a new one."""
    hub = _FakeHub(monkeypatch)
    _, _, model = make_pair("mlp")
    with pytest.raises(ValueError, match="selected_adapters"):
        model.push_to_hub("org/repo", selected_adapters=["nope"])
    assert hub.calls == []

    def unauthorized(api, **kw):
        raise OSError("401 Unauthorized")

    monkeypatch.setattr(HfApi, "hf_hub_download", unauthorized)
    with pytest.raises(OSError, match="401"):
        model.push_to_hub("org/repo")
    assert [c[0] for c in hub.calls] == ["create_repo"] and hub.uploaded == {}


@pytest.mark.skipif(AGAINST_PEFT, reason="PEFT's bar text differs in details")
def test_progress_bars_where_asked(capsys):
    _, _, model = make_pair("llama")
    model.merge_and_unload(progressbar=False)
    assert "merging" not in capsys.readouterr().err
    _, _, model = make_pair("llama")
    model.merge_and_unload(progressbar=True)
    assert "Unloading and merging model" in capsys.readouterr().err
    peft_fast.quantize(base_model("llama"), progressbar=True)
    err = capsys.readouterr().err
    assert "Quantizing to NF4" in err and "14/14" in err
    peft_fast.quantize(base_model("mlp"))
    assert "Quantizing" not in capsys.readouterr().err


def test_merge_and_unload_with_a_bar_gives_the_same_model():
    _, r, i = make_pair("llama")
    x = torch.randint(1, 128, (2, 5))
    with torch.no_grad():
        assert torch.allclose(i.merge_and_unload(progressbar=True)(x).logits,
                              r.merge_and_unload(progressbar=True)(x).logits, atol=1e-5)
