"""The command registry and what several commands share: argparse types that check a value before any
work starts, the ``--preset``/``--config`` pair, and the refusal of stray overrides."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from mtnlg.config import ConfigError
from mtnlg.config.text import overrides_help

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


def finite(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` parse as floats, but are no setting)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


finite.__name__ = "number"


def config_args(p: argparse.ArgumentParser, preset: bool = True) -> None:
    if preset:
        p.add_argument("--preset", help="model preset: tiny, gpt2-small, ..., mt-nlg-530b (see `mtnlg info --list`)")
    p.add_argument("--config", help="TOML (or YAML) file with [model], [train], [data], ... tables")
    p.epilog = overrides_help()
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def no_overrides(overrides: list[str]) -> None:
    if overrides:
        raise ConfigError(f"unrecognized arguments: {' '.join(overrides)}")
