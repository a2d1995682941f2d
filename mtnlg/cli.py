"""The ``mtnlg`` command line: one function per subcommand; its docstring is its ``--help``.

Commands that take a configuration accept ``--config FILE.toml``, ``--preset NAME`` and any
``--section.field=value`` override (see ``mtnlg/config.py``); they are applied in that order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

from mtnlg.config import Config, ConfigError, build_config
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


# -- config ----------------------------------------------------------------------------------------


def _config_cmd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show", "reference"],
                   help="show: the effective config as TOML, each field with its help; "
                        "reference: every field's default as the README's Markdown tables")
    _config_args(p)
    p.add_argument("--update", metavar="FILE", help="reference: rewrite the reference between the markers of FILE")


@command("config", _config_cmd_args)
def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print the configuration a command would use (--preset, --config, overrides) as TOML, or the reference.

    `mtnlg config show ... > run.toml` writes a file that --config reads back.
    """
    from mtnlg.config_text import reference_markdown, to_toml, update_reference

    if args.action == "show":
        print(to_toml(build_config(args.preset, args.config, overrides)), end="")
        return 0
    _no_overrides(overrides)
    if args.preset or args.config:
        raise ConfigError("config reference lists the defaults: it takes no --preset or --config")
    if args.update:
        print(f"{args.update}: {'updated' if update_reference(args.update) else 'already up to date'}")
        return 0
    print(reference_markdown(), end="")
    return 0


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
            print(f"{name:15s} {human(model_info(m).parameters):>8s}  L={m.n_layers} C={m.hidden} H={m.n_heads}")
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
    if m.moe_experts:
        print(f"experts          {m.moe_experts} x ffn {m.expert_ffn_size}, top-{m.moe_top_k}, in {m.moe_layers} of "
              f"{m.n_layers} blocks; active parameters {human(info.active_parameters)} per token")
    print(f"FLOPs/token      forward {human(info.forward_flops_per_token)}, "
          f"training {human(info.train_flops_per_token)} (at seq {m.seq_len})")
    print(f"memory           weights {info.weights_gib_bf16:.1f} GiB in bf16; "
          f"mixed-precision Adam training state {info.train_state_gib_mixed_adam:.1f} GiB")
    if cfg.parallel.pp > 1:
        print(_pipeline_summary(cfg))
    return 0


def _pipeline_summary(cfg: Config) -> str:
    """Stage split and bubble of the configured pipeline, e.g. for --parallel.pp=35."""
    from mtnlg.parallel.pipeline import layer_split, microbatches
    from mtnlg.plan import bubble_fraction

    pc = cfg.parallel
    split = layer_split(cfg.model.n_layers, pc.pp * pc.pp_stages_per_rank)
    sizes = sorted({len(r) for r in split})
    m = microbatches(cfg, max(pc.dp, 1), cfg.train.global_batch_size)
    bubble = bubble_fraction(pc.pp_schedule, pc.pp, m, pc.pp_stages_per_rank)
    return (f"pipeline         {len(split)} stages ({pc.pp} ranks x {pc.pp_stages_per_rank}) of "
            f"{'-'.join(map(str, sizes))} layers; {pc.pp_schedule} with {m} micro-batches: bubble {bubble:.1%}")


# -- plan ------------------------------------------------------------------------------------------


def _plan_args(p: argparse.ArgumentParser) -> None:
    from mtnlg.planner.report import add_arguments

    _config_args(p)
    add_arguments(p)


@command("plan", _plan_args)
def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    """Predict memory per GPU, step time, MFU and days to train of a layout on a cluster (or --search them).

    The model comes from --preset/--config/overrides; the cluster from --gpu (published specs) or the
    explicit figures; the layout from --tp/--pp/--dp/... Nothing is allocated.
    """
    from mtnlg.planner.report import run

    print(run(args, build_config(args.preset or "gpt2-small", args.config, overrides).model))
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
    src.add_argument("--upcycle", metavar="CKPT", help="dense mtnlg checkpoint to turn into a mixture of experts "
                     "(each expert a copy of the dense MLP; --model.moe_* overrides set the rest)")
    p.add_argument("--upcycle-experts", type=int, default=8, metavar="N", help="experts per MoE block (--upcycle)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer to store with the weights (tokenizer.json, or GPT-2's vocab.json + merges.txt); "
                        "default: the one in the source directory, if any")


@command("convert", _convert_args)
def cmd_convert(args: argparse.Namespace, overrides: list[str]) -> int:
    """Convert weights between Hugging Face GPT-2 directories and mtnlg checkpoints, or upcycle a dense
    checkpoint into a mixture of experts."""
    from mtnlg.convert import from_hf, to_hf, upcycle

    if args.upcycle:
        print(f"wrote {upcycle(args.upcycle, args.out, args.upcycle_experts, overrides)}")
        return 0
    _no_overrides(overrides)
    out = (from_hf if args.from_hf else to_hf)(args.from_hf or args.to_hf, args.out, args.tokenizer)
    print(f"wrote {out}")
    if not any((out / name).exists() for name in ("tokenizer", "tokenizer.json")):
        print(f"note: {out} has no tokenizer (none in the source directory): give --tokenizer DIR "
              "here, or to generate and serve")
    return 0


# -- data: corpus, preprocess, dedup ---------------------------------------------------------------


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output JSONL file ({'text': ..., 'source': ...} per line)")
    p.add_argument("--from-dir", metavar="DIR", help="build from the .txt/.md files of DIR instead")
    p.add_argument("--instructions", type=_int_in(1), metavar="N",
                   help="write N synthetic instruction records (reverse / uppercase a few words) for "
                        "`mtnlg finetune` instead")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PROMPT",
                   help="--instructions: prompts to hold out (never written), e.g. those a demo asks")


@command("corpus", _corpus_args)
def cmd_corpus(args: argparse.Namespace, overrides: list[str]) -> int:
    """Write the embedded default corpus (Python's own documentation, PSF license) as JSONL."""
    from mtnlg.data.corpus import build_corpus
    from mtnlg.data.instructions import instruction_items, write_instructions

    _no_overrides(overrides)
    if args.instructions:
        path = write_instructions(args.out, instruction_items(args.instructions, exclude=args.exclude))
        print(f"wrote {args.instructions} instruction records -> {path}")
        return 0
    print(build_corpus(args.out, from_dir=args.from_dir).summary())
    return 0


def _preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl files (one JSON object a line), text files (one document each), folders")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx (Megatron MMIDIDX)")
    p.add_argument("--workers", type=_int_in(1), default=1, help="tokenizer processes (default 1)")
    p.add_argument("--json-key", default="text", help="JSON key holding the text (default 'text')")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("preprocess", _preprocess_args)
def cmd_preprocess(args: argparse.Namespace, overrides: list[str]) -> int:
    """Tokenize JSONL or text into a .bin/.idx indexed dataset (end-of-document token appended)."""
    from mtnlg.data.preprocess import preprocess

    _no_overrides(overrides)
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
    p.add_argument("--json-key", default="text", help="JSON key holding the text (default 'text')")
    p.add_argument("--report", metavar="FILE", help="also write the report as JSON")


@command("dedup", _dedup_args)
def cmd_dedup(args: argparse.Namespace, overrides: list[str]) -> int:
    """Remove exact and near-duplicate (MinHash LSH) documents and low-quality ones from JSONL."""
    from mtnlg.data.dedup import DedupConfig, dedup_jsonl, write_report

    _no_overrides(overrides)
    cfg = DedupConfig(threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram, min_chars=args.min_chars,
                      max_symbol_ratio=args.max_symbol_ratio, exact=not args.no_exact, near=not args.no_near)
    report = dedup_jsonl(args.input, args.output, cfg, json_key=args.json_key)
    print(report.summary())
    if args.report:
        write_report(report, args.report)
    return 0


# -- train -----------------------------------------------------------------------------------------


def _run_args(p: argparse.ArgumentParser) -> None:
    """The flags of a training run (train, finetune)."""
    p.add_argument("--out", help="run directory for checkpoints, log.jsonl and loss.png (train.out)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the newest good checkpoint in --out, with its saved config; "
                        "the options given change it (each change is printed)")
    p.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")


def _train_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--data-path", nargs="+", help="indexed dataset prefix(es), optionally weighted: 0.3 a 0.7 b")
    p.add_argument("--tokenizer", help="tokenizer directory; the model's vocabulary size follows it")
    _run_args(p)


@command("train", _train_args)
def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Pretrain a GPT: AdamW, warmup + cosine LR, mixed precision, exact-resume checkpoints.

    Ctrl-C stops after the current step and saves a checkpoint; --resume continues from it.
    """
    from mtnlg.train.run import run_training

    return _run(args, overrides, run_training, {"data.data_path": args.data_path, "data.tokenizer": args.tokenizer})


def _finetune_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, preset=False)
    p.add_argument("--checkpoint", help="model to start from: run directory, step, export or HF conversion")
    p.add_argument("--data", nargs="+", help="JSONL files of {prompt, completion} or {messages: [...]} records")
    p.add_argument("--tokenizer", help="tokenizer directory, for a checkpoint that has none")
    _run_args(p)


@command("finetune", _finetune_args)
def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    """Fine-tune a checkpoint on instructions or chats: loss on the answers only, packed samples.

    The tokenizer gets the chat template's markers (and the model embedding rows for them); the
    training recipe is [train] as for `mtnlg train`, with the same checkpoints, logs and --resume.
    """
    from mtnlg.train.run import finetune_base, run_finetune

    flags = {"finetune.checkpoint": args.checkpoint, "finetune.data": args.data, "data.tokenizer": args.tokenizer}
    return _run(args, overrides, run_finetune, flags, finetune_base)


def _run(
    args: argparse.Namespace,
    overrides: list[str],
    run: Callable[..., object],
    flags: dict[str, object],
    base: Callable[[Config], Config] | None = None,
) -> int:
    """A training run's config (on --resume the checkpoint's, else on ``base`` of the settings given)
    with the command's ``flags`` (``section.field``: value) set, then ``run`` and its summary."""
    from mtnlg.checkpoint import CheckpointError
    from mtnlg.config import apply_settings, set_field
    from mtnlg.train.run import resume_base

    def with_flags(cfg: Config) -> Config:
        for dotted, value in flags.items():
            if value:
                set_field(cfg, dotted, value, f"--{dotted}")
        return cfg

    try:
        given = with_flags(apply_settings(Config(), None, args.config, overrides))
        run_dir = args.out or given.train.out
        start = resume_base(run_dir) if args.resume else None
        if start is None and base is not None:
            start = base(given)
        cfg = with_flags(build_config(getattr(args, "preset", None), args.config, overrides, base=start))
        cfg.train.out = run_dir
        summary = run(cfg.validate(), resume=args.resume, progress=not args.no_progress)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    if int(os.environ.get("RANK", "0")) != 0:
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
    p.add_argument("--out", help="export: new directory for the exported model")
    p.add_argument("--json", action="store_true", help="inspect: print machine-readable JSON")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing every file against checksums.json")


@command("checkpoint", _checkpoint_cmd_args)
def cmd_checkpoint(args: argparse.Namespace, overrides: list[str]) -> int:
    """Inspect a checkpoint, or export it as a model directory that generate, serve and convert load.

    Both run in one process on a checkpoint written under any parallel layout.
    """
    from mtnlg.checkpoint import CheckpointError
    from mtnlg.checkpoint_tools import export_checkpoint, format_report, inspect_checkpoint

    _no_overrides(overrides)
    try:
        if args.action == "inspect":
            report = inspect_checkpoint(args.path, verify=not args.no_verify)
            print(report.to_json() if args.json else format_report(report))
            return 1 if report.checksums.startswith("FAILED") else 0
        if not args.out:
            raise ConfigError("checkpoint export needs --out DIR")
        print(f"wrote {export_checkpoint(args.path, args.out, verify=not args.no_verify)}")
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    return 0


# -- generate, serve, quantize ---------------------------------------------------------------------


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest step)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: int8 Linear layers, ~3x faster CPU decoding (int8 checkpoints load as int8)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer to use instead of the checkpoint's "
                   "(needed for checkpoints that have none, e.g. converted from an HF directory without one)")


def _load_engine(checkpoint: object, args: argparse.Namespace, **kwargs: object) -> object:
    from mtnlg.generate.engine import Engine

    engine = Engine.from_checkpoint(checkpoint, quantize=args.quantize, **kwargs)
    engine.tokenizer = _cli_tokenizer(args, engine.tokenizer, engine.vocab_size)
    return engine


def _cli_tokenizer(args: argparse.Namespace, found: object, vocab_size: int) -> object:
    """--tokenizer's tokenizer, else the checkpoint's; text in and out needs one, so none is an error."""
    from mtnlg.convert import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer, vocab_size)
    if found is None:
        raise ConfigError(f"{args.checkpoint} has no tokenizer (converted from an HF directory without one?): "
                          "give --tokenizer DIR, or store one with `mtnlg convert ... --tokenizer DIR`")
    return found


def _generate_args(p: argparse.ArgumentParser) -> None:
    _checkpoint_args(p)
    p.add_argument("--prompt", help="text to continue; without it, prompts are read from stdin, one per line")
    _sampling_args(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens if it is too long")
    p.add_argument("--tp", type=_int_in(1), default=1,
                   help="tensor-parallel size; launch with torchrun --nproc_per_node=TP (needs --prompt)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_int_in(0), help="tokens to generate (default: generate.max_new_tokens)")
    p.add_argument("--temperature", type=_finite, help="softmax temperature in [0, 100]; 0 means greedy")
    p.add_argument("--top-k", type=_int_in(0), help="sample among the k most likely tokens; 0 disables")
    p.add_argument("--top-p", type=_finite, help="sample from the smallest set with mass >= p, in (0, 1]; 1 disables")
    p.add_argument("--repetition-penalty", type=_finite, help="CTRL repetition penalty in [0.01, 100]; 1 disables")
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1), help="sampler seed >= 0 (same seed, same text)")
    p.add_argument("--stop", action="append", help="stop string (repeatable); it is not printed")


@command("generate", _generate_args)
def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Generate text from a checkpoint: one --prompt, or prompts read from stdin (interactive).

    Defaults come from the checkpoint's [generate] section; --generate.field=value overrides it.
    """
    from mtnlg.checkpoint import TOKENIZER_DIR, load_config, resolve_verified
    from mtnlg.generate.console import read_prompts, run_prompts

    if args.tp > 1:
        return _generate_tensor_parallel(args, overrides)
    checkpoint = resolve_verified(args.checkpoint)  # everything is checked before the model loads
    params = _sampling_params(args, load_config(checkpoint), overrides)
    if not args.tokenizer and not (checkpoint / TOKENIZER_DIR).is_dir():
        raise ConfigError(f"{checkpoint} has no {TOKENIZER_DIR}/ directory: text prompts need a tokenizer: give "
                          "--tokenizer DIR, or store one with `mtnlg convert ... --tokenizer DIR`")
    engine = _load_engine(checkpoint, args, max_batch_size=1)  # prompts run one at a time
    prompts = [args.prompt] if args.prompt is not None else read_prompts(sys.stdin)
    run_prompts(engine, prompts, params, stream=args.stream, truncate=args.truncate)
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    _checkpoint_args(p)
    p.add_argument("--system", help="system prompt: instructions the whole conversation starts with")
    _sampling_args(p)


@command("chat", _chat_args)
def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> int:
    """Chat with a checkpoint in the terminal: each line you type is a message, the answer streams.

    /reset starts a new conversation, /exit (or end of input) quits; input may be piped. Messages
    are rendered with the checkpoint's chat template (or the default one); sampling defaults come
    from its [generate] section, as for generate.
    """
    from mtnlg.checkpoint import load_config, resolve_verified
    from mtnlg.generate.console import chat, read_prompts

    checkpoint = resolve_verified(args.checkpoint)
    params = _sampling_params(args, load_config(checkpoint), overrides)
    engine = _load_engine(checkpoint, args, max_batch_size=1)
    chat(engine, params, read_prompts(sys.stdin), system=args.system)
    return 0


def _sampling_params(args: argparse.Namespace, config: object, overrides: list[str]) -> object:
    """The checkpoint's [generate] defaults, then --generate.* overrides, then the flags given."""
    from mtnlg.generate.console import sampling_params

    flags = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")}
    return sampling_params(config, overrides, repetition_penalty=args.repetition_penalty, **flags)


def _generate_tensor_parallel(args: argparse.Namespace, overrides: list[str]) -> int:
    """``torchrun --nproc_per_node=TP -m mtnlg generate --tp TP``: each rank runs the engine on its
    shard and samples the same tokens (seeded per sequence); rank 0 prints."""
    from mtnlg.config import ParallelConfig
    from mtnlg.generate.console import run_prompts
    from mtnlg.generate.engine import Engine
    from mtnlg.parallel import destroy_distributed
    from mtnlg.parallel.parallelize import load_parallel_for_inference

    if args.quantize != "none":
        raise ConfigError("--quantize is a single-process CPU layout; it cannot be combined with --tp")
    if args.prompt is None:
        raise ConfigError("--tp needs --prompt: every rank must generate from the same prompt")
    model, cfg, tokenizer, dims = load_parallel_for_inference(args.checkpoint, ParallelConfig(tp=args.tp))
    try:
        tokenizer = _cli_tokenizer(args, tokenizer, cfg.model.vocab_size)
        engine = Engine(model, tokenizer, config=cfg)
        params = _sampling_params(args, cfg, overrides)
        with open(os.devnull, "w") as devnull:
            run_prompts(engine, [args.prompt], params, stream=args.stream, truncate=args.truncate,
                        out=sys.stdout if dims.is_main else devnull)
    finally:
        destroy_distributed()
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    _checkpoint_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=_int_in(1, 65535), default=8000, help="TCP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MTNLG_API_KEY; none if unset)")
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the checkpoint's name)")
    p.add_argument("--max-batch-size", type=_int_in(1), default=8, help="sequences decoded together at most")
    p.add_argument("--max-body-bytes", type=_int_in(1), default=1 << 20,
                   help="largest request body accepted, in bytes (default 1 MiB; larger ones get 413)")


@command("serve", _serve_args)
def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """Serve a checkpoint over HTTP: OpenAI-compatible /v1/completions, Megatron's PUT /api, /health."""
    from mtnlg.checkpoint import resolve_verified
    from mtnlg.generate.server import API_KEY_ENV, create_app, serve

    _no_overrides(overrides)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        where = "--api-key" if args.api_key is not None else f"${API_KEY_ENV}"
        raise ConfigError(f"{where} is empty: give a real key, or none (unset it) to serve without authentication")
    checkpoint = resolve_verified(args.checkpoint)
    sock = _listen(args.host, args.port)  # a port that is taken fails now, not after the model loaded
    engine = _load_engine(checkpoint, args, max_batch_size=args.max_batch_size)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mtnlg serve: warning: listening on {args.host} without an API key: anyone who can reach it "
              f"can use it (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    name = args.model_name or os.path.basename(os.path.abspath(args.checkpoint))
    app = create_app(engine, api_key=api_key, model_name=name, max_body_bytes=args.max_body_bytes)
    serve(app, args.host, args.port, sock=sock)
    return 0


def _listen(host: str, port: int) -> object:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="fp32 checkpoint directory, or a run directory")
    p.add_argument("--out", required=True, help="directory for the int8 checkpoint")


@command("quantize", _quantize_args)
def cmd_quantize(args: argparse.Namespace, overrides: list[str]) -> int:
    """Quantize a checkpoint's Linear layers (and output layer) to int8; generate/serve load it as is."""
    from mtnlg.quantize import quantize_checkpoint

    _no_overrides(overrides)
    print(f"wrote {quantize_checkpoint(args.checkpoint, args.out)}")
    return 0


# -- evaluate --------------------------------------------------------------------------------------


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _checkpoint_args(p)
    p.add_argument("--task", required=True, choices=["perplexity", "cloze", "choice"],
                   help="perplexity of documents; cloze: predict a passage's last word; choice: multiple choice")
    p.add_argument("--data", required=True, help="JSONL file (formats: README, 'Evaluating a checkpoint'); "
                   "perplexity also takes a plain-text file or an indexed dataset prefix")
    p.add_argument("--shots", type=_int_in(0), default=0, help="solved examples before each item (cloze, choice)")
    p.add_argument("--fewshot-data", metavar="FILE", help="JSONL file the few-shot examples are drawn from")
    p.add_argument("--seed", type=_int_in(0), default=0, help="seed of the few-shot draws")
    p.add_argument("--stride", type=_int_in(1), help="perplexity: tokens between window starts "
                   "(default: the context length - 1, which reads each token once)")
    p.add_argument("--prepend-eod", action="store_true",
                   help="perplexity: score each document's first token too, given <|endoftext|>")
    p.add_argument("--json-key", default="text", help="perplexity: JSON key holding the text (default 'text')")
    p.add_argument("--split", default="949,50,1", help="indexed dataset: train/valid/test proportions")
    p.add_argument("--split-name", choices=["train", "valid", "test"], default="valid",
                   help="indexed dataset: the split to score (default valid)")
    p.add_argument("--batch-size", type=_int_in(1), default=8, help="sequences scored together (default 8)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("evaluate", _evaluate_args)
def cmd_evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Evaluate a checkpoint: perplexity (token NLL, bits per byte), cloze accuracy or multiple choice, few-shot."""
    from mtnlg.evaluate import EvalSpec, Scorer, evaluate, format_table, read_task

    _no_overrides(overrides)
    spec = EvalSpec(args.task, args.data, args.shots, args.fewshot_data, args.seed, args.stride, args.prepend_eod,
                    args.json_key, args.split, args.split_name)
    data = read_task(spec)  # bad data fails before the model loads
    scorer = Scorer.from_checkpoint(args.checkpoint, args.quantize, args.device, args.batch_size, args.tokenizer,
                                    progress=not args.quiet)
    results = {"checkpoint": args.checkpoint, **evaluate(scorer, spec, data)}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
