"""``mtnlg train``, ``finetune`` and ``checkpoint``: the training runs and what they write."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mtnlg.cli.args import command, config_args, field_flag, given_fields, no_overrides, overwrite_arg
from mtnlg.config import Config, ConfigError, build_config
from mtnlg.util import dist as rank_info

# -- train -----------------------------------------------------------------------------------------


def _run_args(p: argparse.ArgumentParser) -> None:
    """The flags of a training run (train, finetune)."""
    field_flag(p, "train.out", "--out")
    p.add_argument("--resume", nargs="?", const="auto", choices=["auto"],
                   help="continue exactly from the newest good checkpoint in --out, with its saved config "
                        "(the options given change it; each change is printed), or start from step 0 when "
                        "--out has none; --resume=auto spells the same, so one command line serves the first "
                        "launch and every restart (torchrun --max-restarts)")
    p.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")


def _train_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    field_flag(p, "data.data_path", "--data-path")
    field_flag(p, "data.tokenizer", "--tokenizer", note="The model's vocabulary size follows it.")
    _run_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="build one rank of the run (--rank of --world-size) in this process with a fake process "
                        "group and meta tensors, print what it holds and sends, and train nothing")
    p.add_argument("--world-size", type=int, help="--dry-run: the ranks of the run (e.g. 2240)")
    p.add_argument("--rank", type=int, default=0, help="--dry-run: the rank to build (default 0)")
    p.add_argument("--json", action="store_true", help="--dry-run: print one JSON object")


@command("train", _train_args)
def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Pretrain a GPT: AdamW, warmup + cosine LR, mixed precision, exact-resume checkpoints.

    Ctrl-C or SIGTERM stops after the current step and saves a checkpoint (SIGUSR1 saves and goes
    on); --resume continues from it.
    """
    from mtnlg.train.run import run_training

    if args.dry_run:
        return _dry_run(args, overrides)
    if args.world_size is not None:
        raise ConfigError("--world-size is a --dry-run flag; a real run takes its world from torchrun")
    return _run(args, overrides, run_training)


def _dry_run(args: argparse.Namespace, overrides: list[str]) -> int:
    """``train --dry-run``: the config as a real run builds it, then one rank of the world built and reported."""
    import json

    from mtnlg.config import set_field
    from mtnlg.train.dryrun import dry_run, render

    if args.world_size is None or args.world_size < 1:
        raise ConfigError("--dry-run needs --world-size N (the ranks of the run to simulate)")
    cfg = build_config(getattr(args, "preset", None), args.config, overrides)
    for dotted, value in given_fields(args).items():
        if value:
            set_field(cfg, dotted, value, f"--{dotted}")
    report = dry_run(cfg.validate(), args.world_size, args.rank)
    print(json.dumps(report) if args.json else render(report))
    return 0


def _finetune_args(p: argparse.ArgumentParser) -> None:
    config_args(p, preset=False)
    field_flag(p, "finetune.checkpoint", "--checkpoint")
    field_flag(p, "finetune.data", "--data")
    field_flag(p, "data.tokenizer", "--tokenizer", note="Needed for a checkpoint that has none.")
    _run_args(p)


@command("finetune", _finetune_args)
def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    """Fine-tune a checkpoint on instructions or chats: loss on the answers only, packed samples.

    The tokenizer gets the chat template's markers (and the model embedding rows for them); the
    training recipe is [train] as for `mtnlg train`, with the same checkpoints, logs and --resume.
    """
    from mtnlg.train.run import finetune_base, run_finetune

    return _run(args, overrides, run_finetune, finetune_base)


def _run(
    args: argparse.Namespace,
    overrides: list[str],
    run: Callable[..., object],
    base: Callable[[Config], Config] | None = None,
) -> int:
    """A training run's config (on --resume the checkpoint's, else on ``base`` of the settings given)
    with the command's field flags (``--out``, ``--tokenizer``, ...) that were given set last, then
    ``run`` and its summary."""
    from mtnlg.checkpoint.directory import CheckpointError
    from mtnlg.checkpoint.training import find_resume_point
    from mtnlg.config import apply_settings, set_field
    from mtnlg.train.run import resume_base
    from mtnlg.util.process import DirectoryInUse

    def with_flags(cfg: Config) -> Config:
        for dotted, value in given_fields(args).items():
            if value:
                set_field(cfg, dotted, value, f"--{dotted}")
        return cfg

    try:
        given = with_flags(apply_settings(Config(), None, args.config, overrides))
        run_dir = args.out or given.train.out
        point = find_resume_point(run_dir) if args.resume else None  # found, verified and read once
        start = resume_base(point) if point is not None else base(given) if base is not None else None
        cfg = with_flags(build_config(getattr(args, "preset", None), args.config, overrides, base=start))
        cfg.train.out = run_dir
        summary = run(cfg.validate(), resume=point or bool(args.resume), progress=not args.no_progress)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    except DirectoryInUse as exc:  # another job's directory: not this command's input, exit 1
        print(f"mtnlg {args.command}: {exc}", file=sys.stderr)
        return 1
    if not rank_info.is_main():
        return 0  # under torchrun, one summary for the whole job
    if summary.first_valid_loss is not None:
        print(f"validation loss: first {summary.first_valid_loss:.4f} -> final {summary.final_valid_loss:.4f}")
    print(f"trained {summary.steps} steps ({summary.skipped_steps} skipped) -> {summary.out}"
          + (f"; loss curve {summary.plot}" if summary.plot else ""))
    if not summary.finished:
        print(f"the run continues to train.steps={cfg.train.steps}: mtnlg {args.command} --resume --out {run_dir}")
    return 0


# -- checkpoint ------------------------------------------------------------------------------------


def _checkpoint_cmd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["inspect", "export"],
                   help="inspect: step, tokens, saving layout, model, sizes, checksums; "
                        "export: consolidated weights + config + tokenizer into --out")
    p.add_argument("path", metavar="DIR", help="checkpoint directory, or a run directory (its latest step)")
    p.add_argument("--out", help="export: directory for the exported model (new or empty; see --overwrite)")
    overwrite_arg(p, "an exported model checkpoint")
    p.add_argument("--json", action="store_true", help="inspect: print machine-readable JSON")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing every file against checksums.json")


@command("checkpoint", _checkpoint_cmd_args)
def cmd_checkpoint(args: argparse.Namespace, overrides: list[str]) -> int:
    """Inspect a checkpoint, or export it as a model directory that generate, serve and convert load.

    Both run in one process on a checkpoint written under any parallel layout.
    """
    from mtnlg.checkpoint.directory import CheckpointError
    from mtnlg.checkpoint.tools import export_checkpoint, format_report, inspect_checkpoint

    no_overrides(overrides)
    try:
        if args.action == "inspect":
            report = inspect_checkpoint(args.path, verify=not args.no_verify)
            print(report.to_json() if args.json else format_report(report))
            return 1 if report.checksums.startswith("FAILED") else 0
        if not args.out:
            raise ConfigError("checkpoint export needs --out DIR")
        print(f"wrote {export_checkpoint(args.path, args.out, not args.no_verify, args.overwrite)}")
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    return 0
