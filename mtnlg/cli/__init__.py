"""The ``mtnlg`` command line: one function per subcommand; its docstring is its ``--help``.

Commands that take a configuration accept ``--config FILE.toml``, ``--preset NAME`` and any
``--section.field=value`` override (see ``mtnlg/config.py``); they are applied in that order.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from mtnlg.config import ConfigError
from mtnlg.config_text import overrides_help
from mtnlg.extras import missing_package_message, version_string

Command = Callable[[argparse.Namespace, list[str]], int]
COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    """Register ``fn`` as subcommand ``name``; ``add_arguments`` declares its flags."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = (fn, add_arguments)
        return fn

    return register


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
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


def _finite(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` parse as floats, but are no setting)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


_finite.__name__ = "number"


def _config_args(p: argparse.ArgumentParser, preset: bool = True) -> None:
    if preset:
        p.add_argument("--preset", help="model preset: tiny, gpt2-small, ..., mt-nlg-530b (see `mtnlg info --list`)")
    p.add_argument("--config", help="TOML (or YAML) file with [model], [train], [data], ... tables")
    p.epilog = overrides_help()
    p.formatter_class = argparse.RawDescriptionHelpFormatter


# -- plumbing --------------------------------------------------------------------------------------


def _no_overrides(overrides: list[str]) -> None:
    if overrides:
        raise ConfigError(f"unrecognized arguments: {' '.join(overrides)}")


def _user_error(exc: BaseException) -> bool:
    """Errors that a command's input caused (a message is the whole answer), as opposed to bugs."""
    kinds: list[type] = [ConfigError, OSError, ValueError]
    checkpoint = sys.modules.get("mtnlg.checkpoint")  # imported by the commands that can raise it
    if checkpoint is not None:
        kinds.append(checkpoint.CheckpointError)
    return isinstance(exc, tuple(kinds))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtnlg",
        description="Pretrain and serve GPT-style language models, Megatron-Turing NLG style.",
        epilog="Config overrides: any --section.field=value, e.g. --model.hidden=512 --train.lr=3e-4; "
        "`mtnlg config show` prints every field with its value and help.",
    )
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, add_arguments) in COMMANDS.items():
        doc = (fn.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        add_arguments(p)
        p.set_defaults(_fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        return args._fn(args, rest)
    except ModuleNotFoundError as exc:
        if (message := missing_package_message(exc.name)) is None:
            raise
        print(f"mtnlg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not _user_error(exc):
            raise
        print(f"mtnlg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtnlg {args.command}: interrupted", file=sys.stderr)
        return 130


# The commands register themselves on import, in this order in --help.
from mtnlg.cli import describe, data, train, infer  # noqa: E402, F401, I001

if __name__ == "__main__":
    raise SystemExit(main())
