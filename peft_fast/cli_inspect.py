"""`peft-fast inspect DIR`: what a saved adapter folder holds, and whether it is sound.

It reads the files directly, so it describes folders peft_fast would refuse to load (that is when it is needed):
the config's JSON as written, every tensor one at a time (safetensors) for shapes, dtypes and a NaN/inf check,
the config copy peft_fast keeps in its weights files (`files.check_pair`), and peft_fast's own reading of the
config, whose refusal is reported as a problem and whose warnings as notes.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import warnings
from typing import Any, Iterator

import torch

from . import files
from .cli_common import adapter_folders, human_size, weights_file
from .config import CONFIG_NAME, PeftConfig
from .tuners import registry

PREFIX = "base_model.model."
# Config keys shown as they are, when the file has them (LoRA's, PEFT's names).
FLAGS = ("use_dora", "use_rslora", "lora_bias")
FLAG_NAMES = {"use_dora": "DoRA", "use_rslora": "rsLoRA", "lora_bias": "lora_bias"}
CONFIG_CHECK = {"matches": "the config saved inside the weights matches adapter_config.json",
                "differs": "the config saved inside the weights DIFFERS from adapter_config.json",
                None: "none possible (no config inside the weights: PEFT's files, .bin)"}


def run(args: argparse.Namespace) -> int:
    report = inspect_folder(args.dir)
    print(json.dumps(report, indent=2) if args.json else "\n".join(format_text(report)))
    return 0 if report["ok"] else 1


def inspect_folder(path: str) -> dict[str, Any]:
    """The report: {"path", "ok", "adapters": [one dict per adapter, see describe()]}."""
    adapters = [describe(name, folder) for name, folder in adapter_folders(path)]
    return {"path": os.path.abspath(path), "ok": not any(a["problems"] for a in adapters), "adapters": adapters}


def describe(name: str, folder: str) -> dict[str, Any]:
    info: dict[str, Any] = {"name": name, "path": os.path.abspath(folder), "problems": [], "notes": []}
    config_path = os.path.join(folder, CONFIG_NAME)
    info["files"] = {CONFIG_NAME: os.path.getsize(config_path)}
    try:
        with open(config_path, encoding="utf-8") as fh:
            raw = json.load(fh)
        if not isinstance(raw, dict):
            raise ValueError(f"it holds a JSON {type(raw).__name__}, not an object")
    except (OSError, ValueError) as exc:
        info["problems"].append(f"{CONFIG_NAME} cannot be read: {exc}")
        return info
    info.update(_config_summary(raw))
    _check_config(config_path, info)

    path = weights_file(folder)
    if path is None:
        info["problems"].append(f"no {files.WEIGHTS_NAME} or {files.LEGACY_WEIGHTS_NAME}: the weights are missing")
        return info
    info["weights_file"] = os.path.basename(path)
    for other in (files.WEIGHTS_NAME, files.LEGACY_WEIGHTS_NAME):
        if os.path.isfile(os.path.join(folder, other)):
            info["files"][other] = os.path.getsize(os.path.join(folder, other))
            if other != info["weights_file"]:
                info["notes"].append(f"{other} is ignored: loading reads {info['weights_file']} first")
    info["bytes_on_disk"] = sum(info["files"].values())
    _check_pair(config_path, path, info)
    try:
        info.update(_scan_tensors(path, raw))
    except Exception as exc:  # a corrupt or truncated file, or a pickle weights_only refuses
        info["problems"].append(f"{info['weights_file']} cannot be read ({type(exc).__name__}: {exc}); the file is "
                                "corrupt or truncated, or not a tensor file")
        return info
    bad = info["nonfinite"]
    if bad:
        shown = ", ".join(f"{b['key']} ({b['nan']} NaN, {b['inf']} inf)" for b in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        info["problems"].append(f"{len(bad)} of {info['tensors']} tensors are not finite: {shown}{more}")
    return info


def _config_summary(raw: dict) -> dict[str, Any]:
    out = {
        "peft_type": raw.get("peft_type"),
        "task_type": raw.get("task_type"),
        "base_model": raw.get("base_model_name_or_path"),
        "saved_by": raw.get("peft_version"),
        "r": raw.get("r"),
        "rank_pattern": raw.get("rank_pattern") or {},
        "lora_alpha": raw.get("lora_alpha"),
        "alpha_pattern": raw.get("alpha_pattern") or {},
        "target_modules": sorted(map(str, raw["target_modules"])) if isinstance(raw.get("target_modules"), list)
        else raw.get("target_modules"),
        "exclude_modules": raw.get("exclude_modules"),
        "modules_to_save": raw.get("modules_to_save") or [],
        "bias": raw.get("bias"),
        "lora_dropout": raw.get("lora_dropout"),
    }
    out.update({k: bool(raw.get(k)) for k in FLAGS})
    r, alpha = out["r"], out["lora_alpha"]
    if isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)):
        out["scaling"] = alpha / (math.sqrt(r) if out["use_rslora"] else r)  # what the adapter's delta is scaled by
    return out


def _check_config(config_path: str, info: dict) -> None:
    """peft_fast's reading of the config: a refusal is a problem (loading would fail), a warning a note."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            PeftConfig.from_json_file(config_path)
        except Exception as exc:
            info["problems"].append(f"peft_fast refuses this config: {exc}")
    info["notes"] += [str(w.message) for w in caught]


def _check_pair(config_path: str, weights_path: str, info: dict) -> None:
    if files.CONFIG_KEY not in files.tensors_metadata(weights_path):
        info["config_copy"] = None  # written by PEFT, as .bin, or by an older peft_fast: nothing to compare
        return
    try:
        files.check_pair(config_path, weights_path)
        info["config_copy"] = "matches"
    except files.InterruptedSaveError as exc:
        info["config_copy"] = "differs"
        info["problems"].append(f"interrupted save: {exc}")


def _tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor at a time where the format allows (safetensors), so big files are not loaded whole."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            for key in fh.keys():
                yield key, fh.get_tensor(key)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # mmap needs torch's zip format; older files are read whole
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("it does not hold a dict of tensors")
    yield from state.items()


def _part_names(peft_type: Any) -> set[str]:
    """The key components that name an adapter's own tensors (LoRA: lora_A, lora_B, lora_magnitude_vector, ...),
    from the tuner's layer classes; empty for a type peft_fast does not implement."""
    try:
        spec = registry.get(peft_type)
    except ValueError:
        return set()
    names: set[str] = set()
    for cls in spec.layer_classes:
        names.update(cls.adapter_layer_names)
        names.update(v.split(".")[0] for v in getattr(cls, "file_key_renames", {}).values())
    return names


def _scan_tensors(path: str, raw: dict) -> dict[str, Any]:
    parts = _part_names(raw.get("peft_type") or registry.default_type())
    save_names = raw.get("modules_to_save") or []
    dtypes: collections.Counter = collections.Counter()
    targets: dict[str, str] = {}
    kinds: collections.Counter = collections.Counter()
    nonfinite, count, params = [], 0, 0
    for key, t in _tensors(path):
        count += 1
        params += t.numel()
        dtypes[str(t.dtype).removeprefix("torch.")] += 1
        if t.is_floating_point() and t.numel():
            f = t if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else t.float()
            nan, inf = int(torch.isnan(f).sum()), int(torch.isinf(f).sum())
            if nan or inf:
                nonfinite.append({"key": key, "nan": nan, "inf": inf})
        comps = key.removeprefix(PREFIX).split(".")
        cut = next((i for i, c in enumerate(comps) if c in parts), None)
        if cut:
            targets[".".join(comps[:cut])] = comps[cut - 1]
            kinds["adapter"] += 1
        elif any(n in comps[:-1] or ".".join(comps[:-1]).endswith(n) for n in save_names):
            kinds["modules_to_save"] += 1
        elif comps[-1] == "bias":
            kinds["bias"] += 1
        else:
            kinds["other"] += 1
    return {"tensors": count, "parameters": params, "dtypes": dict(sorted(dtypes.items())),
            "tensor_kinds": dict(kinds), "targets_found": len(targets) if parts else None,
            "target_layers": dict(sorted(collections.Counter(targets.values()).items())), "nonfinite": nonfinite}


def _writer(version) -> str:
    if not version:
        return "unknown"
    if str(version).startswith("peft_fast-"):
        return "peft_fast " + str(version).removeprefix("peft_fast-")
    return f"PEFT {version}"


# --- text ------------------------------------------------------------------------------------------------------
def format_text(report: dict) -> list[str]:
    adapters = report["adapters"]
    lines = [f"{report['path']}: {len(adapters)} adapter{'s' if len(adapters) != 1 else ''}"
             + ("" if adapters[0]["name"] == "default" else " (no default adapter at the top)")]
    for a in adapters:
        lines += [""] + _adapter_lines(a)
    problems = sum(len(a["problems"]) for a in adapters)
    lines += ["", "OK" if report["ok"] else f"{problems} problem{'s' if problems != 1 else ''} found"]
    return lines


def _adapter_lines(a: dict) -> list[str]:
    out = [f"adapter {a['name']!r} ({a['path']})"]
    row = lambda k, v: out.append(f"  {k:<18}{v}")  # noqa: E731
    if "peft_type" in a:
        row("type", f"{a['peft_type']}, task {a['task_type'] or 'none'}")
        row("base model", a["base_model"] or "unknown")
        if a["r"] is not None:
            row("rank", f"r={a['r']}" + (f", rank_pattern {json.dumps(a['rank_pattern'])}" if a["rank_pattern"]
                                         else ""))
        if a["lora_alpha"] is not None:
            scaling = f" (scaling {a['scaling']:g})" if "scaling" in a else ""
            row("alpha", f"{a['lora_alpha']:g}{scaling}" + (f", alpha_pattern {json.dumps(a['alpha_pattern'])}"
                                                               if a["alpha_pattern"] else ""))
        row("options", ", ".join(f"{FLAG_NAMES[k]} {'yes' if a[k] else 'no'}" for k in FLAGS)
            + f", bias {a['bias']}, dropout {a['lora_dropout']}")
        targets = a["target_modules"]
        row("targets", (", ".join(targets) if isinstance(targets, list) else str(targets))
            + (f" (excluding {a['exclude_modules']})" if a["exclude_modules"] else ""))
        if a.get("targets_found") is not None:
            layers = ", ".join(f"{k} x{v}" for k, v in a["target_layers"].items())
            row("adapted modules", f"{a['targets_found']}" + (f": {layers}" if layers else ""))
        row("modules_to_save", ", ".join(a["modules_to_save"]) or "none")
    if "tensors" in a:
        dtypes = ", ".join(f"{k} x{v}" for k, v in a["dtypes"].items())
        kinds = ", ".join(f"{v} {k}" for k, v in a["tensor_kinds"].items())
        row("tensors", f"{a['tensors']} ({kinds or 'none'}), {a['parameters']:,} parameters")
        row("dtypes", dtypes or "none")
        row("finite", "yes, every tensor" if not a["nonfinite"] else f"NO: {len(a['nonfinite'])} tensor(s)")
    if "files" in a:
        total = f" ({human_size(sum(a['files'].values()))} in all)" if len(a["files"]) > 1 else ""
        row("files", ", ".join(f"{n} {human_size(s)}" for n, s in a["files"].items()) + total)
    if "saved_by" in a:
        row("saved by", _writer(a["saved_by"]))
    if "config_copy" in a:
        row("config check", CONFIG_CHECK[a["config_copy"]])
    out += [f"  problem: {p}" for p in a["problems"]]
    out += [f"  note: {n}" for n in a["notes"]]
    return out
