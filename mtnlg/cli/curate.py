"""``mtnlg curate`` (dedup, decontamination, PII, language ID, tokenizing, on datatrove's engines)
and ``mtnlg merge`` (Megatron datasets joined into one)."""

from __future__ import annotations

import argparse
import json

from mtnlg.cli.args import command, int_in, json_key_arg, no_overrides, quiet_arg, strict_arg


def _curate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, help=".jsonl files or folders of them (each file one shard)")
    p.add_argument("--output", required=True,
                   help="folder: kept records as RANK.jsonl, stats.json, the resumable work in .curate/")
    p.add_argument("--tasks", type=int_in(1), default=0, help="tasks per shard stage (default: one per input file)")
    p.add_argument("--workers", type=int_in(1), default=1, help="tasks run at once (default 1)")
    p.add_argument("--engine", choices=["local", "ray", "slurm"], default="local",
                   help="local processes (default), a Ray cluster, or Slurm job arrays")
    p.add_argument("--ray-address", help="--engine ray: the cluster's address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--slurm-partition", help="--engine slurm: the partition")
    p.add_argument("--slurm-time", default="4:00:00", help="--engine slurm: time limit per job (4:00:00)")
    p.add_argument("--dedup-threshold", type=float, default=0.8,
                   help="Jaccard similarity of near duplicates (0.8, MT-NLG's)")
    p.add_argument("--num-perm", type=int_in(2), default=128, help="MinHash values per signature (128)")
    p.add_argument("--no-dedup", action="store_true", help="keep duplicates (skip the MinHash stages)")
    p.add_argument("--decontaminate", nargs="+", default=[], metavar="TASK.jsonl",
                   help="evaluation task files (mtnlg evaluate's formats): remove documents sharing an n-gram")
    p.add_argument("--contamination-ngram", type=int_in(1), default=13, help="words per n-gram (13)")
    p.add_argument("--report-only", action="store_true", help="count contaminated documents, keep them")
    p.add_argument("--redact-pii", action="store_true",
                   help="replace e-mails, public IPs, phone and card numbers by placeholders")
    p.add_argument("--languages", help="keep only these languages (ISO 639-1, comma-separated: en,de)")
    p.add_argument("--language-score", type=float, default=0.5, help="least probability of the language (0.5)")
    p.add_argument("--tokenizer", help="also tokenize the kept documents into OUTPUT/tokens/RANK.bin/.idx")
    json_key_arg(p)
    strict_arg(p)
    quiet_arg(p)


@command("curate", _curate_args)
def cmd_curate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Curate JSONL at scale: fuzzy and exact dedup, decontamination, PII redaction, language ID."""
    from mtnlg.data.curate.pipeline import CurateConfig, run_curation

    no_overrides(overrides)
    options = {"ray": {"address": args.ray_address},
               "slurm": {"partition": args.slurm_partition, "time": args.slurm_time}}.get(args.engine, {})
    cfg = CurateConfig(
        inputs=args.input, output=args.output, tasks=args.tasks, workers=args.workers, engine=args.engine,
        dedup=not args.no_dedup, threshold=args.dedup_threshold, num_perm=args.num_perm,
        decontaminate=args.decontaminate, contamination_ngram=args.contamination_ngram,
        report_only=args.report_only, redact_pii=args.redact_pii,
        languages=[x.strip() for x in (args.languages or "").split(",") if x.strip()],
        language_score=args.language_score, tokenizer=args.tokenizer, strict=args.strict, text_key=args.json_key,
        progress=not args.quiet, engine_options=options,
    )
    stats = run_curation(cfg)
    if stats.get("submitted"):
        print(f"submitted the curation jobs; their logs and completion markers: {stats['logs']}")
        return 0
    print(json.dumps(stats["summary"], indent=1))
    print(f"kept records -> {args.output}/*.jsonl, stats -> {args.output}/stats.json")
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefixes", nargs="+", metavar="PREFIX", help="datasets to join (PREFIX.bin/.idx), in order")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")


@command("merge", _merge_args)
def cmd_merge(args: argparse.Namespace, overrides: list[str]) -> int:
    """Join Megatron .bin/.idx datasets into one, equal to their concatenation (Megatron's merge_datasets)."""
    from mtnlg.data.merge import merge_datasets

    no_overrides(overrides)
    print(merge_datasets(args.prefixes, args.output_prefix).summary())
    return 0
