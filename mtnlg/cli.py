"""The ``mtnlg`` command line: one function per subcommand; its docstring is its ``--help``.

Commands that take a configuration accept ``--config FILE.toml``, ``--preset NAME`` and any
``--section.field=value`` override (see ``mtnlg/config.py``); they are applied in that order.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from mtnlg.config import ConfigError, build_config

Command = Callable[[argparse.Namespace, list[str]], int]
COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    """Register ``fn`` as subcommand ``name``; ``add_arguments`` declares its flags."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = (fn, add_arguments)
        return fn

    return register


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model preset: tiny, gpt2-small, ..., mt-nlg-530b (see `mtnlg info --list`)")
    p.add_argument("--config", help="TOML (or YAML) file with [model], [train], [data], ... tables")


# -- info ------------------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--list", action="store_true", help="list the presets and exit")


@command("info", _info_args)
def cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
    """Parameters, FLOPs per token and memory of a model shape (nothing is allocated)."""
    from mtnlg.plan import human, model_info
    from mtnlg.presets import PRESETS

    if args.list:
        for name, m in PRESETS.items():
            print(f"{name:14s} {human(model_info(m).parameters):>8s}  L={m.n_layers} C={m.hidden} H={m.n_heads}")
        return 0
    cfg = build_config(args.preset or "gpt2-small", args.config, overrides)
    info = model_info(cfg.model)
    if args.json:
        print(json.dumps({"model": cfg.to_dict()["model"], **info.to_dict()}, indent=2))
        return 0
    m = cfg.model
    print(f"model            L={m.n_layers} hidden={m.hidden} heads={m.n_heads} ffn={m.ffn_size} seq={m.seq_len}")
    print(f"vocabulary       {m.vocab_size} (padded to {info.padded_vocab_size})")
    print(f"parameters       {human(info.parameters)} ({info.parameters:,}); "
          f"non-embedding {human(info.non_embedding_parameters)}")
    print(f"FLOPs/token      forward {human(info.forward_flops_per_token)}, "
          f"training {human(info.train_flops_per_token)} (at seq {m.seq_len})")
    print(f"memory           weights {info.weights_gib_bf16:.1f} GiB in bf16; "
          f"mixed-precision Adam training state {info.train_state_gib_mixed_adam:.1f} GiB")
    return 0


# -- tokenizer -------------------------------------------------------------------------------------


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train", "encode"], help="train a BPE, or encode text with one")
    p.add_argument("--input", nargs="+", help="train: .jsonl ({'text': ...} per line) or text files")
    p.add_argument("--vocab-size", type=int, default=8192, help="train: vocabulary size (default 8192)")
    p.add_argument("--min-frequency", type=int, default=2, help="train: minimum pair count to merge")
    p.add_argument("--out", help="train: output directory for tokenizer.json")
    p.add_argument("--tokenizer", help="encode: tokenizer directory")
    p.add_argument("--text", help="encode: the text to encode")


@command("tokenizer", _tokenizer_args)
def cmd_tokenizer(args: argparse.Namespace, overrides: list[str]) -> int:
    """Train a byte-level BPE tokenizer from text, or encode text with one."""
    from mtnlg.data.tokenizer import Tokenizer, iter_text_files

    _no_overrides(overrides)
    if args.action == "train":
        if not args.input or not args.out:
            raise ConfigError("tokenizer train needs --input FILE... and --out DIR")
        tok = Tokenizer.train(iter_text_files(args.input), args.vocab_size, args.min_frequency, show_progress=True)
        tok.save(args.out)
        print(f"trained a {tok.vocab_size}-token BPE (end of document = id {tok.eod_id}) -> {args.out}")
        return 0
    if not args.tokenizer or args.text is None:
        raise ConfigError("tokenizer encode needs --tokenizer DIR and --text TEXT")
    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "tokens": [tok.token_str(i) for i in ids]}, ensure_ascii=False))
    return 0


# -- convert ---------------------------------------------------------------------------------------


def _convert_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="local Hugging Face GPT-2 directory to import")
    src.add_argument("--to-hf", metavar="CKPT", help="mtnlg checkpoint (or run directory) to export")
    p.add_argument("--out", required=True, help="output directory")


@command("convert", _convert_args)
def cmd_convert(args: argparse.Namespace, overrides: list[str]) -> int:
    """Convert weights between Hugging Face GPT-2 directories and mtnlg checkpoints."""
    from mtnlg.convert import from_hf, to_hf

    _no_overrides(overrides)
    out = from_hf(args.from_hf, args.out) if args.from_hf else to_hf(args.to_hf, args.out)
    print(f"wrote {out}")
    return 0


# -- plumbing --------------------------------------------------------------------------------------


def _no_overrides(overrides: list[str]) -> None:
    if overrides:
        raise ConfigError(f"unrecognized arguments: {' '.join(overrides)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtnlg",
        description="Pretrain and serve GPT-style language models, Megatron-Turing NLG style.",
        epilog="Config overrides: any --section.field=value, e.g. --model.hidden=512 --train.lr=3e-4.",
    )
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
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"mtnlg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtnlg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
