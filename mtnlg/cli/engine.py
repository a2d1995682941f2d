"""How the inference commands (generate, chat, serve, evaluate) load a checkpoint into an engine:
the checkpoint, quantization and context-override flags, the KV cache and speculation switches,
and what ``--tp`` does not combine with yet. One place, so the commands cannot drift apart.
"""

from __future__ import annotations

import argparse

from mtnlg.cli.args import field_flag, given_fields, int_in
from mtnlg.config import ConfigError
from mtnlg.config.families import CONTEXT_FIELDS


def checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest step)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="int8: int8 Linear layers, ~3x faster CPU decoding; int4: 4-bit weights in groups of 128 "
                        "input columns (quantized checkpoints load in their format)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer to use instead of the checkpoint's "
                   "(needed for checkpoints that have none, e.g. converted from an HF directory without one)")
    for name in CONTEXT_FIELDS:  # a trained model run at a longer context (docs/long-sequences.md)
        field_flag(p, f"model.{name}", "--" + name.replace("_", "-"), fallback="the checkpoint's")


def kv_cache_args(p: argparse.ArgumentParser) -> None:
    """The KV cache switches of generate and serve (docs/serving.md)."""
    p.add_argument("--kv-cache", choices=["paged", "contiguous"],
                   help="paged: blocks from one pool, shared prefixes, admission by free blocks (the default); "
                        "contiguous: one buffer per batch at its full length (the default with --speculative)")
    p.add_argument("--kv-cache-bytes", type=int_in(1), metavar="BYTES",
                   help="size of the paged pool (default: a quarter of the free memory, at most 4 x "
                        "--max-batch-size full-length sequences)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="share the cached blocks of prompts that start alike (paged; default on)")
    p.add_argument("--prefill-chunk", type=int_in(1), metavar="TOKENS",
                   help="prefill long prompts at most TOKENS per step, between the others' decode steps "
                        "(paged; default: whole prompts)")


def speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", choices=["none", "ngram", "draft"], default="none",
                   help="speculative decoding (lossless): ngram guesses from the prompt and output, draft from a "
                        "small model (--draft-checkpoint); the model checks the guesses in one forward")
    p.add_argument("--num-speculative-tokens", type=int_in(1), metavar="K", help="guesses per step (default 4)")
    p.add_argument("--draft-checkpoint", metavar="DIR", help="draft model for --speculative draft (same tokenizer)")


def _kv_cache(args: argparse.Namespace) -> str:
    """The cache ``--kv-cache`` names, else paged; speculative decoding rolls back rejected guesses
    in the contiguous cache, the only one it runs on so far."""
    speculative = getattr(args, "speculative", "none") != "none"
    if speculative and args.kv_cache == "paged":
        raise ConfigError("--speculative runs on the contiguous KV cache: drop --kv-cache paged or --speculative")
    return args.kv_cache or ("contiguous" if speculative else "paged")


def load_engine(checkpoint: object, args: argparse.Namespace, **kwargs: object) -> object:
    from mtnlg.generate.engine import Engine
    from mtnlg.generate.speculative import speculation_for

    kv = {"kv_cache": _kv_cache(args), "kv_cache_bytes": args.kv_cache_bytes, "prefix_cache": args.prefix_cache,
          "prefill_chunk": args.prefill_chunk} if hasattr(args, "kv_cache") else {}
    engine = Engine.from_checkpoint(checkpoint, quantize=args.quantize, context=context_override(args), **kv, **kwargs)
    engine.tokenizer = cli_tokenizer(args, engine.tokenizer, engine.vocab_size)
    if getattr(args, "speculative", "none") != "none" or getattr(args, "draft_checkpoint", None):
        try:
            engine.speculation = speculation_for(engine, args.speculative, args.num_speculative_tokens,
                                                 args.draft_checkpoint)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return engine


def context_override(args: argparse.Namespace) -> dict:
    """--seq-len, --rope-scaling, ...: the context override given, checked against the checkpoint's config
    before its weights load."""
    import copy

    from mtnlg.checkpoint.directory import resolve_verified
    from mtnlg.checkpoint.model import load_config
    from mtnlg.model.rope import extend_context

    given = given_fields(args, "model")
    if given:
        extend_context(copy.deepcopy(load_config(resolve_verified(args.checkpoint)).model), **given)
    return given


def cli_tokenizer(args: argparse.Namespace, found: object, vocab_size: int) -> object:
    """--tokenizer's tokenizer, else the checkpoint's; text in and out needs one, so none is an error."""
    from mtnlg.checkpoint.convert import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer, vocab_size)
    if found is None:
        raise ConfigError(f"{args.checkpoint} has no tokenizer (converted from an HF directory without one?): "
                          "give --tokenizer DIR, or store one with `mtnlg convert ... --tokenizer DIR`")
    return found


def tensor_parallel_limits(args: argparse.Namespace) -> None:
    """What ``--tp`` (generate, serve) does not combine with yet: each rank runs the contiguous
    cache's decoder on its shard, without quantized layouts or speculation."""
    for given, flag in ((args.quantize != "none", "--quantize"), (args.speculative != "none", "--speculative"),
                        (args.kv_cache == "paged", "--kv-cache paged")):
        if given:
            raise ConfigError(f"{flag} is not available with --tp yet (each rank decodes with the contiguous "
                              "KV cache): drop one of them")
