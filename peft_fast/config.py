"""PeftConfig: what every tuner's config shares (PEFT's PeftConfig fields, targeting, adapter_config.json), and
the one entry point that reads any config by its `peft_type`.

A tuner's config subclasses PeftConfig as a dataclass, sets `PEFT_TYPE`, and lists the keys PEFT writes for that
tuner which it does not model (`PEFT_ONLY_KEYS`, with their neutral values), split by what ignoring them would do.
A shared field that PEFT's config for the tuner lacks (IA3 has no `layers_to_transform`) is redeclared there with
`field(default=None, init=False)`: it then stays None, is no constructor argument, and is neither written to nor
read from adapter_config.json.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from .enums import TASK_TYPES
from .files import AdapterFileNotFoundError, atomic_write_text, resolve_file
from .tuners import registry
from .version import __version__

CONFIG_NAME = "adapter_config.json"


class ConfigError(ValueError, TypeError):
    """A config field holds a value of the wrong type or out of its range; the message names the field and value.
    Both a ValueError and a TypeError, so that code catching either (as for PEFT's own checks) catches it."""


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "None"
    if origin in (list, set, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}" if args else "a list"
    if origin is dict:
        return f"a dict of {_describe(args[0]).removeprefix('a ')} to {_describe(args[1]).removeprefix('a ')}"
    names = {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a str", dict: "a dict"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)  # not 0/1, and never a string such as "false", which is truthy
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, set, tuple):
        return isinstance(value, (list, set, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


@functools.lru_cache(maxsize=None)
def _absent_fields(cls) -> frozenset[str]:
    """Shared fields this config class does not have in PEFT (redeclared with init=False)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if not f.init)


@functools.lru_cache(maxsize=None)
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


class _AcceptsPeftKeys(type):
    """Constructors take the keys PEFT's config class has and peft_fast does not model, as files do
    (`PeftConfig.peft_only`): `LoraConfig(use_qalora=False, ...)` or `LoraConfig(**peft_config.to_dict())` as
    with PEFT. Other unknown arguments still raise TypeError."""

    def __call__(cls, *args: Any, **kwargs: Any):
        kept = {}
        if kwargs and cls.PEFT_TYPE is not None:
            kept = cls.kept_peft_keys(kwargs)
            kwargs = cls.peft_only(kwargs, f"{cls.__name__}()", unknown_ok=True)
        config = super().__call__(*args, **kwargs)
        config.peft_only_values = kept
        return config


@dataclass(kw_only=True)
class PeftConfig(metaclass=_AcceptsPeftKeys):
    """Fields every adapter type has. Subclasses add their own (positional first, as PEFT's configs)."""

    PEFT_TYPE: ClassVar[Optional[str]] = None
    # Keys PEFT writes for this tuner that peft_fast does not model, with the value meaning "feature unused"
    # (every config's file has auto_mapping, written by save_pretrained).
    PEFT_ONLY_KEYS: ClassVar[dict[str, Any]] = {"auto_mapping": None}
    INERT_KEYS: ClassVar[tuple[str, ...]] = ("auto_mapping",)  # ignored whatever their value
    OUTPUT_CHANGING_KEYS: ClassVar[tuple[str, ...]] = ()  # refused unless neutral: ignoring them changes outputs

    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_type: Optional[str] = None

    def __post_init__(self) -> None:
        if type(self) is PeftConfig:
            raise TypeError("PeftConfig is the base of the adapter configs: use LoraConfig (or another tuner's "
                            "config), or PeftConfig.from_pretrained(path) to read a saved one.")
        for name, hint in _field_types(type(self)).items():
            value = getattr(self, name)
            if not _matches(value, hint):
                raise ConfigError(f"{type(self).__name__}.{name} must be {_describe(hint)}, got {value!r} "
                                  f"({type(value).__name__}).")
        self.peft_type = registry.peft_type_name(self.peft_type or self.PEFT_TYPE)
        if self.task_type is not None:  # TaskType members (str enums) are stored as the strings files hold
            self.task_type = registry.peft_type_name(self.task_type)
        if self.peft_type != self.PEFT_TYPE:
            raise ValueError(f"{type(self).__name__} describes peft_type {self.PEFT_TYPE!r}, but this config has "
                             f"peft_type={self.peft_type!r}; peft_fast implements {', '.join(registry.known())}.")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"Invalid task type: {self.task_type!r}. Must be one of: {', '.join(TASK_TYPES)}.")
        as_set = lambda v: set(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        self.target_modules, self.exclude_modules = as_set(self.target_modules), as_set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    # --- conversions -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        absent = _absent_fields(type(self))
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in absent}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the config") -> "PeftConfig":
        """Build from adapter_config.json's contents; on PeftConfig itself, the class its `peft_type` names."""
        if cls is PeftConfig:
            cls = cls.named_class(data)
        kwargs = cls.peft_only(data, source)
        try:
            config = cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        config.peft_only_values = cls.kept_peft_keys(data)
        return config

    @classmethod
    def named_class(cls, data: dict[str, Any]) -> type:
        """The config class `data`'s peft_type names (on PeftConfig itself; a subclass is its own)."""
        if cls is not PeftConfig:
            return cls
        return registry.get(data.get("peft_type") or registry.default_type()).config_cls

    @classmethod
    def check_file(cls, data: dict[str, Any], source: str) -> None:
        """A saved adapter_config.json's checks beyond the fields' (PEFT's `check_kwargs`, run on files only):
        files written by older PEFT versions, for example."""

    @classmethod
    def peft_only(cls, data: dict[str, Any], source: str, unknown_ok: bool = False) -> dict[str, Any]:
        """`data` without the keys this class does not model: PEFT's at their neutral values and inert ones are
        dropped, those that would change the outputs refused, initialisation recipes dropped with a warning, unknown
        keys dropped with a warning (kept instead with `unknown_ok`, for the constructor to refuse)."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in sorted(set(data) - known):
            value = data[key]
            if key == "peft_version":  # which PEFT wrote it
                continue
            if key not in cls.PEFT_ONLY_KEYS:
                if unknown_ok:
                    kwargs[key] = value
                else:
                    warnings.warn(f"{source}: unknown key {key!r} is ignored (written by a newer PEFT or another "
                                  "tool?).")
            elif value == cls.PEFT_ONLY_KEYS[key] or value in (None, {}, [], False) or key in cls.INERT_KEYS:
                continue
            elif key in cls.OUTPUT_CHANGING_KEYS:
                # Ignoring these would silently give outputs different from PEFT's: refuse instead.
                raise NotImplementedError(f"{source}: {key}={value!r} is a PEFT feature that changes the model's "
                                          "outputs and peft_fast does not implement it yet; use Hugging Face PEFT "
                                          "for this adapter.")
            else:
                warnings.warn(f"{source}: {key}={value!r} (a PEFT initialisation or training option) is ignored.")
        return kwargs

    @classmethod
    def kept_peft_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The PEFT-only values in `data` that `peft_only` ignores but PEFT writes back as given (an EVA recipe,
        `qalora_group_size`): kept on the config as `peft_only_values`, so that its files and `to_peft()` carry
        them as PEFT's would."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kept = {}
        for key, value in data.items():
            # (PEFT never writes runtime_config, save_pretrained writes auto_mapping, and PEFT empties loftq_config
            # unless LoftQ initialises, which peft_fast refuses)
            if (key in known or key not in cls.PEFT_ONLY_KEYS or key in ("runtime_config", "auto_mapping",
                                                                          "loftq_config")
                    or key in cls.OUTPUT_CHANGING_KEYS or value == cls.PEFT_ONLY_KEYS[key]
                    or value in (None, {}, [], False)):
                continue
            kept[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
        return kept

    @classmethod
    def from_peft(cls, config: Any) -> "PeftConfig":
        """Build from a Hugging Face PEFT config object (anything with `to_dict` and `peft_type`)."""
        target = registry.get(getattr(config, "peft_type", None)).config_cls
        if cls is not PeftConfig and target is not cls:
            raise ValueError(f"{cls.__name__} cannot be built from a {type(config).__name__} "
                             f"(peft_type={registry.peft_type_name(config.peft_type)}).")
        data = config.to_dict()
        for key in ("task_type", "peft_type"):
            data[key] = getattr(data.get(key), "value", data.get(key))
        return target.from_dict(data, source=f"peft.{type(config).__name__}")

    def to_peft(self) -> Any:
        """The same config as Hugging Face PEFT's class (e.g. peft.LoraConfig), for tools that accept only PEFT's
        configs, such as TRL's `peft_config=`: build the model inside `peft_fast.patch_peft()` to run it on
        peft_fast's kernels."""
        try:
            from peft import get_peft_config
        except ImportError as exc:
            raise ImportError("to_peft() needs Hugging Face PEFT (`pip install peft`).") from exc
        data = {k: sorted(v) if isinstance(v, set) else v for k, v in self.to_dict().items()}
        return get_peft_config({**copy.deepcopy(getattr(self, "peft_only_values", {})), **data})

    # --- files -------------------------------------------------------------------------------------------------
    def to_json_string(self, auto_mapping: Optional[dict] = None) -> str:
        """PEFT's adapter_config.json: every key PEFT writes (its features we lack at their neutral values)."""
        written = {k: v for k, v in self.PEFT_ONLY_KEYS.items() if k != "runtime_config"}  # PEFT never writes it
        written.update(getattr(self, "peft_only_values", {}))
        data = {**copy.deepcopy(written), **self.to_dict(), "auto_mapping": auto_mapping}
        data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
        data["peft_version"] = f"peft_fast-{__version__}"
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str, auto_mapping: Optional[dict] = None) -> None:
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string(auto_mapping))

    @classmethod
    def from_json_file(cls, path_json_file: str) -> "PeftConfig":
        path = path_json_file  # (PEFT's parameter names, for callers passing them by keyword)
        if not os.path.isfile(path):
            raise AdapterFileNotFoundError(f"Can't find {CONFIG_NAME} at {path!r}: is this a folder written by "
                                           "save_pretrained?")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); the adapter config is corrupt, save it again.") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
        target = cls.named_class(data)
        target.check_file(data, path)
        return target.from_dict(data, source=path)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **hub_kwargs: Any) -> "PeftConfig":
        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        return cls.from_json_file(path)

    @property
    def is_prompt_learning(self) -> bool:
        return False


def replace_config(config: PeftConfig, **changes: Any) -> PeftConfig:
    """dataclasses.replace, keeping the PEFT-only values (`peft_only_values`) the new object would not get."""
    new = dataclasses.replace(config, **changes)
    new.peft_only_values = copy.deepcopy(getattr(config, "peft_only_values", {}))
    return new


def as_config(config: Any) -> PeftConfig:
    """Accept a peft_fast config, a Hugging Face PEFT config, or a dict (adapter_config.json's contents)."""
    if isinstance(config, PeftConfig):
        return config
    if isinstance(config, dict):
        return PeftConfig.from_dict(config)
    if hasattr(config, "to_dict") and hasattr(config, "peft_type"):
        return PeftConfig.from_peft(config)
    raise TypeError(f"Expected a peft_fast or PEFT config (e.g. LoraConfig), got {type(config).__name__}.")
