"""What the CLI commands share: their two error kinds, finding the adapters of a folder, and output folders."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from .config import CONFIG_NAME
from .files import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME


class CliError(Exception):
    """The command failed: `error: <message>` on stderr, exit code 1."""
    code = 1


class UsageError(CliError):
    """The command line is wrong (a missing or wrong kind of path, an occupied output folder): exit code 2."""
    code = 2


def adapter_folders(path: str) -> list[tuple[str, str]]:
    """(adapter name, folder) of every adapter saved in `path`, in PEFT's layout: "default" at the top (when there
    is one), every other adapter in a subfolder named after it. UsageError when `path` holds none."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such folder")
    if not os.path.isdir(path):
        raise UsageError(f"{path} is a file, not an adapter folder (pass the folder save_pretrained wrote)")
    found = [("default", path)] if os.path.isfile(os.path.join(path, CONFIG_NAME)) else []
    for entry in sorted(os.listdir(path)):
        sub = os.path.join(path, entry)
        if os.path.isdir(sub) and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            found.append((entry, sub))
    if not found:
        hint = ""
        if os.path.isfile(os.path.join(path, "config.json")):
            hint = " It holds a config.json: this looks like a model folder, not an adapter."
        elif any(os.path.isfile(os.path.join(path, w)) for w in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)):
            hint = f" It holds adapter weights without their {CONFIG_NAME}: the folder is incomplete."
        raise UsageError(f"{path} is not an adapter folder: no {CONFIG_NAME} in it or in its subfolders.{hint}")
    return found


def weights_file(folder: str) -> str | None:
    """The weights file loading would read (safetensors before .bin, as peft_fast and PEFT do), or None."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def check_output(out: str, force: bool, sources: tuple[str, ...] = ()) -> None:
    """Refuse to write into a non-empty `out` without --force, into a file, or into one of the inputs."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out} is a file; OUT must be a folder")
    for src in sources:
        if os.path.isdir(src) and os.path.isdir(out) and os.path.samefile(src, out):
            raise UsageError(f"OUT ({out}) is the input folder {src}; write to another folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UsageError(f"{out} exists and is not empty; pass --force to write into it")


def _umask() -> int:
    umask = os.umask(0)  # there is no call that reads the umask without setting it
    os.umask(umask)
    return umask


def _publishable(stage: str) -> None:
    """Give the staged folder and files a new folder's and file's usual modes: mkdtemp makes 0700, and writers
    that go through temp files (safetensors through transformers) may leave 0600."""
    umask = _umask()
    for root, _, names in os.walk(stage):
        os.chmod(root, 0o777 & ~umask)
        for n in names:
            os.chmod(os.path.join(root, n), 0o666 & ~umask)


def _clashes(src: str, dst: str) -> list[str]:
    """Paths under `dst` that a file of `src` cannot replace: a folder where a file goes, or a file where a folder
    goes (found before anything moves, so that a refused publish changes nothing)."""
    out = []
    for entry in os.listdir(src):
        s, d = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.isdir(s) and os.path.isdir(d):
            out += _clashes(s, d)
        elif os.path.lexists(d) and os.path.isdir(s) != os.path.isdir(d):
            out.append(d)
    return out


def _move_into(src: str, dst: str) -> None:
    """Move every file of `src` into `dst`, one atomic rename per file (subfolders merged)."""
    os.makedirs(dst, exist_ok=True)
    for entry in os.listdir(src):
        s, d = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.isdir(s) and os.path.isdir(d):
            _move_into(s, d)
        else:
            os.replace(s, d)


@contextlib.contextmanager
def staged_output(out: str) -> Iterator[str]:
    """A temp folder to write into; on success its files become `out`'s. A new `out` is staged beside it and
    renamed in one step; an existing folder (a mount point, a symlink's target, ".") is staged inside itself, on
    its own file system, and filled file by file, the folder itself kept. A command that fails or is killed leaves
    `out` as it was: transformers' save_pretrained writes its files in place, so a half-written model is never
    seen under `out`."""
    out = os.path.realpath(out)
    exists = os.path.isdir(out)
    parent = out if exists else os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    try:
        yield stage
        _publishable(stage)
        if not exists:
            os.rename(stage, out)
            return
        clashes = _clashes(stage, out)
        if clashes:
            raise CliError(f"{clashes[0]} is in the way (a file where a folder goes, or the reverse); nothing was "
                           "written: remove it, or write to another folder")
        _move_into(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def human_size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"
