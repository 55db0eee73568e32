"""File plumbing: atomic writes, finding adapter files locally or on the Hub, reading safetensors safely."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


class AdapterFileNotFoundError(FileNotFoundError, ValueError):
    """A missing adapter file. A ValueError too, as PEFT raises for the same case."""


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_write(path, write)


def atomic_save_tensors(path: str, tensors: dict[str, torch.Tensor], safe_serialization: bool = True) -> None:
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():  # safetensors refuses aliased tensors; PEFT saves such keys as copies too
        v = v.detach()
        ptr = v.untyped_storage().data_ptr()
        out[k] = (v.clone() if ptr in seen else v).contiguous().cpu()
        seen.add(ptr)
    tensors = out
    if safe_serialization:
        from safetensors.torch import save_file

        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        _atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def resolve_file(path: str, filename: str, subfolder: Optional[str] = None, **hub_kwargs: Any) -> str:
    """Local folder first; otherwise treat ``path`` as a Hugging Face Hub repo id."""
    folder = os.path.join(path, subfolder) if subfolder else path
    local = os.path.join(folder, filename)
    if os.path.isdir(folder):
        if not os.path.isfile(local):
            raise AdapterFileNotFoundError(f"{filename} not found in {folder!r}; the adapter folder is incomplete.")
        return local
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:
        raise AdapterFileNotFoundError(f"Adapter folder {folder!r} does not exist.")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path, filename, subfolder=subfolder, **hub_kwargs)
    except Exception as exc:  # network errors, missing repos, missing files: one clear message
        raise AdapterFileNotFoundError(
            f"Could not find {filename} for {path!r}: not a local folder, and the Hub download failed ({exc})."
        ) from exc


def find_weights(path: str, subfolder: Optional[str] = None, **hub_kwargs: Any) -> str:
    try:
        return resolve_file(path, WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    except AdapterFileNotFoundError as first:
        try:
            return resolve_file(path, LEGACY_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
        except AdapterFileNotFoundError:
            raise first from None


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"Could not read adapter weights from {path} ({type(exc).__name__}: {exc}); the file is "
                         "corrupt or truncated: save the adapter again.") from exc
