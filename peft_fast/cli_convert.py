"""`peft-fast convert DIR OUT --to safetensors|bin`: an adapter folder's weights in the other file format.

Every adapter of DIR (the default one and those in subfolders) is read as loading reads it: a pair from two saves
is refused (`files.check_pair`), a .bin with `torch.load(weights_only=True)`. Each is written as save_pretrained
writes: weights first, then adapter_config.json (its bytes unchanged), each file atomically; safetensors weights
carry the config copy that lets a later load detect an interrupted save.
"""
from __future__ import annotations

import argparse
import os

from . import files
from .cli_common import CliError, adapter_folders, check_output, weights_file
from .config import CONFIG_NAME

TARGET_NAMES = {"safetensors": files.WEIGHTS_NAME, "bin": files.LEGACY_WEIGHTS_NAME}


def run(args: argparse.Namespace) -> int:
    adapters = adapter_folders(args.dir)
    check_output(args.out, args.force, sources=(args.dir,))
    target = TARGET_NAMES[args.to]
    stale = TARGET_NAMES["bin" if args.to == "safetensors" else "safetensors"]
    # Everything is read and checked before the first file is written: a bad adapter leaves OUT untouched.
    loaded = []
    for name, folder in adapters:
        config_path, path = os.path.join(folder, CONFIG_NAME), weights_file(folder)
        if path is None:
            raise CliError(f"{folder}: no {files.WEIGHTS_NAME} or {files.LEGACY_WEIGHTS_NAME} next to its "
                           f"{CONFIG_NAME}")
        files.check_pair(config_path, path)
        with open(config_path, encoding="utf-8") as fh:
            text = fh.read()
        loaded.append((name, text, files.load_tensors(path), os.path.basename(path)))
        out_dir = args.out if name == "default" else os.path.join(args.out, name)
        if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
            raise CliError(f"{out_dir} is a file, where adapter {name!r} goes; nothing was written: remove it, or "
                           "write to another folder")
    for name, text, tensors, source in loaded:
        out_dir = args.out if name == "default" else os.path.join(args.out, name)
        os.makedirs(out_dir, exist_ok=True)
        files.clean_temps(out_dir)
        # Loading reads safetensors before .bin: a leftover of the other format in OUT would shadow the new file.
        if os.path.isfile(os.path.join(out_dir, stale)):
            os.unlink(os.path.join(out_dir, stale))
        metadata = {files.CONFIG_KEY: text} if args.to == "safetensors" else None
        files.atomic_save_tensors(os.path.join(out_dir, target), tensors, safe_serialization=args.to == "safetensors",
                                  metadata=metadata)
        files.atomic_write_text(os.path.join(out_dir, CONFIG_NAME), text)
        print(f"{name}: {source} -> {os.path.join(out_dir, target)} ({len(tensors)} tensors)")
    return 0
