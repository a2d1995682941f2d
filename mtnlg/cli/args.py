"""The command registry and what several commands share: argparse types that check a value before any
work starts, the ``--preset``/``--config`` pair, the refusal of stray overrides, and the flags that
stand for config fields.

A convenience flag such as ``--out`` (``train.out``) or ``--temperature`` (``generate.temperature``)
is declared with ``field_flag``, which takes its type, help, default and range from the dataclass
field (and ``mtnlg.config.sampling``'s table), so a flag cannot drift from the field it sets;
``given_fields`` reads back the ones given. ``config_args`` also lists every ``--section.field``
override in ``--help``, one argument group per section, generated from the same dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

from mtnlg.config import Config, ConfigError
from mtnlg.config.build import coerce, lookup
from mtnlg.config.sampling import SAMPLING
from mtnlg.config.text import overrides_help, toml_value

Command = Callable[[argparse.Namespace, list[str]], int]
COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    """Register ``fn`` as subcommand ``name``; ``add_arguments`` declares its flags."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = (fn, add_arguments)
        return fn

    return register


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], checked before the command does any work."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high if high is not None else 'inf'}]")
        return value

    parse.__name__ = "integer"
    return parse


def config_args(p: argparse.ArgumentParser, preset: bool = True) -> None:
    if preset:
        p.add_argument("--preset", help="model preset: tiny, gpt2-small, ..., mt-nlg-530b (see `mtnlg info --list`)")
    p.add_argument("--config", help="TOML (or YAML) file with [model], [train], [data], ... tables")
    p.epilog = overrides_help()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    list_config_fields(p)


def json_key_arg(p: argparse.ArgumentParser, scope: str = "") -> None:
    """``--json-key``: which key of a JSON Lines record holds the text (``scope`` prefixes the help)."""
    p.add_argument("--json-key", default="text", help=f"{scope}JSON key holding the text (default 'text')")


def strict_arg(p: argparse.ArgumentParser) -> None:
    """``--strict``: a bad line (``mtnlg.data.jsonl``) ends the run instead of being counted and skipped."""
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of counting and "
                   "skipping it")


def quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``, as every command that writes a directory spells it (``checkpoint.output``)."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing --out that already holds {what}; any other non-empty --out is "
                        "refused, and so is one that is or overlaps the source")


def no_overrides(overrides: list[str]) -> None:
    if overrides:
        raise ConfigError(f"unrecognized arguments: {' '.join(overrides)}")


# -- flags that stand for config fields ------------------------------------------------------------

_FIELD_FLAGS = "_field_flags"  # the parser default holding {dest: "section.field"} of its field flags


def field_flag(
    p: argparse.ArgumentParser,
    dotted: str,
    flag: str,
    note: str = "",
    fallback: str = "",
    use_default: bool = False,
    **kwargs: Any,
) -> argparse.Action:
    """Add ``flag`` as a shorthand of the config field ``dotted`` (``section.field``), with the
    field's type, help and default, and the range of ``SAMPLING`` for a [generate] field.

    The flag's value is None when it is not given (so a preset, a file, overrides or a checkpoint's
    config decide), unless ``use_default``: then it is the field's default. ``note`` adds what the
    flag means for this command; ``fallback`` says where a value not given comes from (shown before
    the field's default). ``kwargs`` go to ``add_argument`` (e.g. a stricter ``type``)."""
    field, annotation = lookup(dotted, flag)
    default = _default(field)
    shown = f"{fallback}, else {toml_value(default)}" if fallback else toml_value(default)
    text = " ".join(x for x in (field.metadata.get("help", ""), note) if x)
    options: dict[str, Any] = {"type": _field_type(dotted, flag, annotation),
                               "help": f"{text} (--{dotted}{'' if kwargs.get('required') else f'; default {shown}'})"
                                       .replace("%", "%%"),
                               "default": default if use_default else None}
    if typing.get_origin(annotation) is list:
        options["nargs"] = "+"
    action = p.add_argument(flag, **{**options, **kwargs})
    p.set_defaults(**{_FIELD_FLAGS: {**(p.get_default(_FIELD_FLAGS) or {}), action.dest: dotted}})
    return action


def given_fields(args: argparse.Namespace, section: str | None = None) -> dict[str, Any]:
    """``{"section.field": value}`` of the field flags given on the command line (those not None),
    in declaration order; with ``section``, only that section's, keyed by the bare field name."""
    given = {dotted: getattr(args, dest) for dest, dotted in getattr(args, _FIELD_FLAGS, {}).items()
             if getattr(args, dest) is not None}
    if section is None:
        return given
    return {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith(f"{section}.")}


def _default(field: dataclasses.Field) -> Any:
    """A dataclass field's default (a fresh one for a list field's factory)."""
    return field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]


def _field_type(dotted: str, flag: str, annotation: Any) -> Callable[[str], Any]:
    """An argparse type converting one value as ``--section.field`` would, then checking the
    ``SAMPLING`` range of a [generate] field; the one-line error names the flag and the field."""
    item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation
    setting = SAMPLING.get(dotted.split(".", 1)[1]) if dotted.startswith("generate.") else None

    def parse(text: str) -> Any:
        try:
            value = coerce(text, dotted, flag) if item is annotation else text if item is str else item(text)
            if setting is not None:
                setting.check(dotted, value)
        except ValueError as exc:  # ConfigError included
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None
        return value

    parse.__name__ = getattr(item, "__name__", "value")
    return parse


def _metavar(annotation: Any) -> str:
    """How --help shows a field's value: INT, NUMBER, BOOL, TEXT, or a comma list of them."""
    if typing.get_origin(annotation) is list:
        return _metavar(typing.get_args(annotation)[0]) + ",..."
    return {int: "INT", float: "NUMBER", bool: "BOOL"}.get(annotation, "TEXT")


def list_config_fields(p: argparse.ArgumentParser) -> None:
    """List every ``--section.field`` override in ``p``'s --help, one group per section, each with
    its help and default.

    The entries are for reading only: the overrides are parsed by ``mtnlg.config.parse_overrides``
    from what argparse leaves over (so ``--model.hidden 512``, typos with a "did you mean" and the
    order of repeated overrides behave as they always did). The entries are therefore added to each
    group's list of actions, not registered with the parser, which would parse them (and accept
    abbreviations of them)."""
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        doc = " ".join((inspect.getdoc(cls) or "").split())
        group = p.add_argument_group(f"[{section.name}] settings (--{section.name}.FIELD=VALUE)", doc)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            help_text = f"{f.metadata.get('help', '')} (default {toml_value(_default(f))})".replace("%", "%%")
            entry = argparse.Action([f"--{section.name}.{f.name}"], f"{section.name}.{f.name}",
                                    metavar=_metavar(hints[f.name]), help=help_text)
            group._group_actions.append(entry)  # shown in --help, never parsed (see the docstring)
