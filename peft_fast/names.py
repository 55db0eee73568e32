"""Adapter names: what may be one, checked wherever a name enters (adding, loading, merging into a new adapter,
saving a selection).

A name becomes a key of the layers' ModuleDicts (parameter names: no dots) and, for every adapter but "default", a
folder under the save directory (no path separators, no "..", nothing absolute, which `os.path.join` would let
escape the directory). "__base__" means "no adapter" in mixed batches, so no adapter may take it.
"""
from __future__ import annotations

import os

BASE_NAME = "__base__"


def check_adapter_name(name) -> str:
    """`name` if it can name an adapter; else a ValueError (TypeError for a non-string) saying why."""
    if not isinstance(name, str):
        raise TypeError(f"An adapter name must be a str, got {name!r} ({type(name).__name__}).")
    problem = None
    if not name.strip():
        problem = "it is empty"
    elif name == BASE_NAME:
        problem = f"{BASE_NAME!r} is reserved: it means 'no adapter' in mixed batches (adapter_names=...)"
    elif "/" in name or "\\" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        problem = "it contains a path separator, and save_pretrained would write outside its directory"
    elif os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        problem = "it is an absolute path, and save_pretrained would write there"
    elif "." in name:
        problem = "it contains a dot ('..' would leave the save directory, and parameter names cannot hold dots)"
    elif any(ord(c) < 32 for c in name):
        problem = "it contains control characters"
    if problem:
        raise ValueError(f"Invalid adapter name {name!r}: {problem}. Use a plain name such as 'default' or "
                         "'my-adapter_2' (letters, digits, '-', '_').")
    return name
