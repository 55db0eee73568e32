"""File plumbing: atomic writes, verifiable file pairs, finding adapter files locally or on the Hub, reading
safetensors safely.

An adapter is two files written one after the other. Each is replaced atomically (temp file, fsync, rename), and
the weights file carries, in its safetensors metadata, a copy of the adapter_config.json written right after it: a
save killed between the two renames leaves weights next to an older config, which loading refuses (`check_pair`)
instead of running new weights with, say, an old scaling. Only settings that change what the adapter computes are
compared, so editing the base model's name or path by hand still loads. PEFT's files (no copy) load as before.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_KEY = "peft_fast_config"  # safetensors metadata: the adapter_config.json saved with the weights
# adapter_config.json keys that do not change what an adapter computes (hand edits of these are fine).
INERT_CONFIG_KEYS = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version")
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")  # _atomic_write's temp files


class AdapterFileNotFoundError(FileNotFoundError, ValueError):
    """A missing adapter file. A ValueError too, as PEFT raises for the same case."""


class InterruptedSaveError(ValueError):
    """adapter_config.json and the weights next to it come from two different saves."""


def _default_mode() -> int:
    """The mode open() would give a new file here (0644 under the usual umask 022), as PEFT's files get."""
    try:
        with open("/proc/self/status") as fh:
            umask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename: readers never see a half-written file. The temp
    name carries our pid, so a later save can tell a dead writer's leftovers from a live one's (`clean_temps`)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600, which writers may keep
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)  # the rename is durable before the next file of the pair is renamed
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def clean_temps(folder: str) -> list[str]:
    """Remove temp files that a killed save left in `folder` (their writer's pid is gone); returns their names."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for entry in os.listdir(folder):
        m = _TEMP.match(entry)
        if m is None or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        try:
            os.unlink(os.path.join(folder, entry))
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed




_FOLDER_LOCKS: dict[str, threading.Lock] = {}
_FOLDER_LOCKS_GUARD = threading.Lock()


@contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """Writers of one folder in this process, one at a time: each file is atomic, but two threads saving there at
    once could leave one's weights beside the other's config (refused at load as an interrupted save)."""
    key = os.path.realpath(folder)
    with _FOLDER_LOCKS_GUARD:
        lock = _FOLDER_LOCKS.setdefault(key, threading.Lock())
    with lock:
        yield


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_write(path, write)


def atomic_save_tensors(path: str, tensors: dict[str, torch.Tensor], safe_serialization: bool = True,
                        metadata: Optional[dict[str, str]] = None) -> None:
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

        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))
    else:
        _atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def resolve_file(path: str, filename: str, subfolder: Optional[str] = None, **hub_kwargs: Any) -> str:
    """Local folder first; otherwise treat ``path`` as a Hugging Face Hub repo id."""
    folder = os.path.join(path, subfolder) if subfolder else path
    local = os.path.join(folder, filename)
    if os.path.isdir(folder):
        if not os.path.isfile(local):
            inside = sorted(e for e in os.listdir(folder) if os.path.isfile(os.path.join(folder, e, filename)))
            hint = (f" It holds adapters in subfolders ({', '.join(inside)}), as save_pretrained writes every adapter "
                    "but 'default': pass subfolder=<name> (load_adapter: the same)." if inside and not subfolder
                    else " The adapter folder is incomplete.")
            raise AdapterFileNotFoundError(f"{filename} not found in {folder!r}.{hint}")
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


def tensors_metadata(path: str) -> dict[str, str]:
    """The metadata of a safetensors file (empty for .bin files, which have none)."""
    if not path.endswith(".safetensors"):
        return {}
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # a corrupt header is reported by load_tensors, with the file's name
        return {}


def check_pair(config_path: str, weights_path: str) -> None:
    """Refuse a config that disagrees with the one saved inside the weights file (see the module docstring)."""
    saved = tensors_metadata(weights_path).get(CONFIG_KEY)
    if saved is None:
        return  # written by PEFT or an older peft_fast: nothing to check against
    try:
        with open(config_path, encoding="utf-8") as fh:
            on_disk, with_weights = json.load(fh), json.loads(saved)
    except (OSError, ValueError):
        return  # an unreadable config is reported, with its own message, when it is parsed
    if not isinstance(on_disk, dict) or not isinstance(with_weights, dict):
        return
    keys = sorted((set(on_disk) | set(with_weights)) - set(INERT_CONFIG_KEYS))
    differ = [k for k in keys if on_disk.get(k) != with_weights.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {on_disk.get(k)!r} in the file, {with_weights.get(k)!r} with the weights"
                          for k in differ[:3])
        raise InterruptedSaveError(
            f"{config_path} does not match the config {weights_path} was saved with ({shown}). A save into this "
            "folder was interrupted between its two files, or the config was edited by hand afterwards. Nothing was "
            "loaded. Save the adapter again; to load these weights with the edited config anyway, pass it "
            "explicitly: PeftModel.from_pretrained(model, path, config=PeftConfig.from_pretrained(path)).")


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"Could not read adapter weights from {path} ({type(exc).__name__}: {exc}); the file is "
                         "corrupt or truncated: save the adapter again.") from exc
