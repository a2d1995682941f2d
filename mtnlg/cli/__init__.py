"""The ``mtnlg`` command line: one function per subcommand; its docstring is its ``--help``.

Commands that take a configuration accept ``--config FILE.toml``, ``--preset NAME`` and any
``--section.field=value`` override (see ``mtnlg.config``), applied in that order. The command
registry and the flags several commands share are in ``args``, how the inference commands load an
engine in ``engine``; the commands, by purpose, in ``describe``, ``data``, ``curate``, ``train`` and
``infer`` (``serve_parallel``: every rank's part of ``serve --tp``).

May import: every other package of mtnlg.
"""

from __future__ import annotations

import argparse
import sys

# The commands register themselves on import, in this order in --help.
from mtnlg.cli import curate, data, describe, infer, train  # noqa: F401, I001
from mtnlg.cli.args import COMMANDS
from mtnlg.config import ConfigError
from mtnlg.util.extras import missing_package_message, version_string
from mtnlg.util.memory import return_freed_memory

# Commands whose allocations vary in size (documents, records, requests): freed memory goes back.
VARIED_ALLOCATIONS = frozenset({"serve", "evaluate", "preprocess", "finetune", "generate", "chat", "tokenizer"})


def _user_error(exc: BaseException) -> bool:
    """Errors that a command's input caused (a message is the whole answer), as opposed to bugs."""
    kinds: list[type] = [ConfigError, OSError, ValueError]
    checkpoint = sys.modules.get("mtnlg.checkpoint.directory")  # imported by the commands that can raise it
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
    if args.command in VARIED_ALLOCATIONS:
        return_freed_memory()
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


if __name__ == "__main__":
    raise SystemExit(main())
