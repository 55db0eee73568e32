"""PeftModel.push_to_hub: the adapter's files (PEFT's layout: adapter_config.json, the weights, other adapters in
sub-folders) and its model card go to a Hub model repo in one commit. The card starts from the one already in the
repo, if any, so a repo's own text survives; transformers' generic push would replace it with a card that calls the
adapter a transformers model."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Optional


def push_to_hub(model, repo_id: str, *, commit_message: Optional[str] = None,
                commit_description: Optional[str] = None, private: Optional[bool] = None,
                token: Optional[Any] = None, revision: Optional[str] = None, create_pr: bool = False,
                safe_serialization: bool = True, selected_adapters: Optional[list[str]] = None,
                tags: Optional[list[str]] = None, **save_kwargs: Any):
    """Create the repo if needed and upload the adapter in one commit; returns the Hub's CommitInfo."""
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    model._adapters_to_save(selected_adapters)  # a bad selection creates no repo or branch
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        try:
            existing = api.hf_hub_download(repo_id=repo_id, filename="README.md", revision=revision, token=token)
            with open(existing, encoding="utf-8") as src, open(os.path.join(folder, "README.md"), "w",
                                                               encoding="utf-8") as dst:
                dst.write(src.read())
        except (EntryNotFoundError, RevisionNotFoundError):  # a new repo (or branch): a new card
            pass
        model.save_pretrained(folder, safe_serialization=safe_serialization, selected_adapters=selected_adapters,
                              **save_kwargs)
        if tags:
            card_path = os.path.join(folder, "README.md")
            card = ModelCard.load(card_path)
            card.data.tags = list(card.data.tags or []) + [t for t in tags if t not in (card.data.tags or [])]
            card.save(card_path)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message or
                                 "Upload adapter", commit_description=commit_description, token=token,
                                 revision=revision, create_pr=create_pr)
