"""Uploading a converted pipeline folder to the Hugging Face Hub."""

from __future__ import annotations

import os

from huggingface_hub import HfApi


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Add MAR pipeline converted from LTH14/mar with diffusers-mar",
) -> str:
    """Create (or reuse) the Hub model repo `repo_id` and upload `folder` to it; returns the repo URL."""
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message,
    )
    return str(repo_url)
