"""``mtnlg tokenizer``, ``corpus``, ``preprocess`` and ``dedup``: from text to the datasets training reads."""

from __future__ import annotations

import argparse
import json

from mtnlg.cli.args import command, field_flag, int_in, json_key_arg, no_overrides, quiet_arg, strict_arg
from mtnlg.config import ConfigError
from mtnlg.util.fs import atomic_dir

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

    no_overrides(overrides)
    if args.action == "train":
        if not args.input or not args.out:
            raise ConfigError("tokenizer train needs --input FILE... and --out DIR")
        tok = Tokenizer.train(iter_text_files(args.input), args.vocab_size, args.min_frequency, show_progress=True)
        atomic_dir(args.out, tok.save)  # a complete tokenizer directory, or the previous one
        print(f"trained a {tok.vocab_size}-token BPE (end of document = id {tok.eod_id}) -> {args.out}")
        return 0
    if not args.tokenizer or args.text is None:
        raise ConfigError("tokenizer encode needs --tokenizer DIR and --text TEXT")
    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "tokens": [tok.token_str(i) for i in ids]}, ensure_ascii=False))
    return 0


# -- data: corpus, preprocess, dedup ---------------------------------------------------------------


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output JSONL file ({'text': ..., 'source': ...} per line)")
    p.add_argument("--from-dir", metavar="DIR", help="build from the .txt/.md files of DIR instead")
    p.add_argument("--instructions", type=int_in(1), metavar="N",
                   help="write N synthetic instruction records (reverse / uppercase a few words) for "
                        "`mtnlg finetune` instead")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PROMPT",
                   help="--instructions: prompts to hold out (never written), e.g. those a demo asks")


@command("corpus", _corpus_args)
def cmd_corpus(args: argparse.Namespace, overrides: list[str]) -> int:
    """Write the embedded default corpus (Python's own documentation, PSF license) as JSONL."""
    from mtnlg.data.corpus import build_corpus
    from mtnlg.data.instructions import instruction_items, write_instructions

    no_overrides(overrides)
    if args.instructions:
        path = write_instructions(args.out, instruction_items(args.instructions, exclude=args.exclude))
        print(f"wrote {args.instructions} instruction records -> {path}")
        return 0
    print(build_corpus(args.out, from_dir=args.from_dir).summary())
    return 0


def _preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl files (one JSON object a line), text files (one document each), folders")
    field_flag(p, "data.tokenizer", "--tokenizer", required=True)
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx (Megatron MMIDIDX)")
    p.add_argument("--workers", type=int_in(1), default=1, help="tokenizer processes (default 1)")
    json_key_arg(p)
    strict_arg(p)
    quiet_arg(p)


@command("preprocess", _preprocess_args)
def cmd_preprocess(args: argparse.Namespace, overrides: list[str]) -> int:
    """Tokenize JSONL or text into a .bin/.idx indexed dataset (end-of-document token appended)."""
    from mtnlg.data.preprocess import preprocess

    no_overrides(overrides)
    report = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers,
                        json_key=args.json_key, strict=args.strict, progress=not args.quiet)
    print(report.summary())
    return 0


def _dedup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="input .jsonl")
    p.add_argument("--output", required=True, help="output .jsonl with the kept lines, unchanged")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of near-duplicates (0.8)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash signature length (128)")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle (5)")
    p.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this (0: off)")
    p.add_argument("--max-symbol-ratio", type=float, default=1.0,
                   help="drop documents with a larger share of non-alphanumeric characters (1: off)")
    p.add_argument("--no-exact", action="store_true", help="keep exact duplicates")
    p.add_argument("--no-near", action="store_true", help="keep near duplicates")
    json_key_arg(p)
    p.add_argument("--report", metavar="FILE", help="also write the report as JSON")


@command("dedup", _dedup_args)
def cmd_dedup(args: argparse.Namespace, overrides: list[str]) -> int:
    """Remove exact and near-duplicate (MinHash LSH) documents and low-quality ones from JSONL."""
    from mtnlg.data.dedup import DedupConfig, dedup_jsonl, write_report

    no_overrides(overrides)
    cfg = DedupConfig(threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram, min_chars=args.min_chars,
                      max_symbol_ratio=args.max_symbol_ratio, exact=not args.no_exact, near=not args.no_near)
    report = dedup_jsonl(args.input, args.output, cfg, json_key=args.json_key)
    print(report.summary())
    if args.report:
        write_report(report, args.report)
    return 0
