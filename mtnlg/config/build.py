"""A ``Config`` from its sources: a preset, then a TOML (or YAML) file, then ``--section.field=value``
overrides, each value converted to its field's declared type with an error that names the field.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

from mtnlg.config.presets import get_preset
from mtnlg.config.sections import Config, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


def _section_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _unknown(kind: str, name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"{where}: unknown {kind} {name!r}{hint}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a TOML/JSON/CLI value to the field's declared type, or raise a ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = _parse_list(value, where)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, where) for v in value]
    if origin in (typing.Union, types.UnionType):
        return value  # Optional fields are not used yet; keep the raw value.
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _parse_list(text: str, where: str) -> list[Any]:
    """A list given on the command line: ``4,4,8``, ``4 4 8`` or TOML's ``[4, 4, 8]`` / ``['a', 'b']``."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            return list(tomllib.loads(f"v = {text}")["v"])
        except tomllib.TOMLDecodeError:
            text = text[1:-1]  # [a, b]: unquoted words, as in the comma form
    items = text.replace(",", " ").split()
    if any(item.startswith(("[", "]")) or item.endswith(("[", "]")) for item in items):
        raise ConfigError(f"{where}: cannot read {text!r} as a list: write 4,4,8 or [4, 4, 8]")
    return items


def lookup(dotted: str, where: str = "override") -> tuple[dataclasses.Field, Any]:
    """The dataclass field ``section.field`` names and its declared type; unknown names are errors
    (with a close match suggested). The CLI's flags take their help, default and type from it."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{where}: expected section.field, got {dotted!r}")
    section_name, field_name = parts
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
    if section_name not in sections:
        raise _unknown("section", section_name, list(sections), where)
    section_cls = sections[section_name]
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    if field_name not in fields:
        raise _unknown(f"field of [{section_name}]", field_name, list(fields), where)
    return fields[field_name], typing.get_type_hints(section_cls)[field_name]


def coerce(value: Any, dotted: str, where: str = "override") -> Any:
    """``value`` converted to the declared type of field ``section.field``, or a ConfigError."""
    return _coerce(value, lookup(dotted, where)[1], f"{where}: {dotted}")


def set_field(cfg: Config, dotted: str, value: Any, where: str = "override") -> None:
    """Set ``section.field`` on ``cfg`` with type conversion; unknown names are errors."""
    field, annotation = lookup(dotted, where)
    setattr(getattr(cfg, dotted.split(".")[0]), field.name, _coerce(value, annotation, f"{where}: {dotted}"))


def update(cfg: Config, data: dict[str, Any], source: str) -> None:
    """Apply a nested mapping ``{section: {field: value}}`` (as read from TOML/JSON)."""
    for section_name, values in data.items():
        if section_name not in _section_names(cfg):
            raise _unknown("section", section_name, _section_names(cfg), source)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table of fields, got {values!r}")
        for name, value in values.items():
            set_field(cfg, f"{section_name}.{name}", value, source)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (or, with PyYAML installed, YAML) config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from None
        return yaml.safe_load(text) or {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Turn ``--model.hidden=512`` / ``--model.hidden 512`` into (dotted, value) pairs."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognized argument {arg!r}: overrides look like --section.field=value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args):
            i += 1
            value = args[i]
        else:
            raise ConfigError(f"override {arg!r} needs a value")
        pairs.append((key, value))
        i += 1
    return pairs


def build_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    base: Config | None = None,
) -> Config:
    """Preset, then file, then CLI overrides, on top of ``base`` (a resumed run's saved config;
    default: the dataclass defaults); the result is validated. ``base`` is not modified."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    return apply_settings(cfg, preset, file, overrides).validate()


def apply_settings(
    cfg: Config, preset: str | None = None, file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Apply a preset, a file and overrides to ``cfg`` in place, without validating the result."""
    if preset:
        cfg.model = get_preset(preset)
    if file:
        update(cfg, load_file(file), str(file))
    for key, value in parse_overrides(overrides or []):
        set_field(cfg, key, value, f"--{key}")
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """A validated Config from a nested mapping (a checkpoint's config.json); unknown names name ``source``."""
    cfg = Config()
    update(cfg, data, source)
    return cfg.validate()


def runtime_fields(section_cls: type) -> set[str]:
    """The fields of a section marked ``runtime``: free to differ between a checkpoint and its loader."""
    return {f.name for f in dataclasses.fields(section_cls) if f.metadata.get("runtime")}


def field_help(section_cls: type) -> dict[str, str]:
    """Help text of each field of a config section, for --help and the reference in docs/configuration.md."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(section_cls)}


def changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(section.field, old value, new value)`` for every field that differs, in declaration order."""
    before, after = old.to_dict(), new.to_dict()
    return [(f"{section}.{name}", before[section][name], value)
            for section, values in after.items() for name, value in values.items()
            if before[section][name] != value]
