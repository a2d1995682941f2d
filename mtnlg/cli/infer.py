"""``mtnlg convert``, ``generate``, ``chat``, ``serve``, ``quantize`` and ``evaluate``: using a checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mtnlg.cli.args import (
    command,
    field_flag,
    given_fields,
    int_in,
    json_key_arg,
    no_overrides,
    overwrite_arg,
    quiet_arg,
)
from mtnlg.cli.engine import (
    checkpoint_args,
    cli_tokenizer,
    context_override,
    kv_cache_args,
    load_engine,
    speculative_args,
)
from mtnlg.config import ConfigError
from mtnlg.util.fs import write_json

# -- convert ---------------------------------------------------------------------------------------


def _convert_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR",
                     help="local Hugging Face directory to import (GPT-2, Llama, Mistral, Qwen 2, Qwen 3)")
    src.add_argument("--to-hf", metavar="CKPT", help="mtnlg checkpoint (or run directory) to export")
    src.add_argument("--upcycle", metavar="CKPT", help="dense mtnlg checkpoint to turn into a mixture of experts "
                     "(each expert a copy of the dense MLP; --model.moe_* overrides set the rest)")
    p.add_argument("--upcycle-experts", type=int, default=8, metavar="N", help="experts per MoE block (--upcycle)")
    p.add_argument("--out", required=True, help="output directory (new or empty; see --overwrite)")
    overwrite_arg(p, "what this command writes (a model checkpoint; a Hugging Face directory for --to-hf)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer to store with the weights (tokenizer.json, or GPT-2's vocab.json + merges.txt); "
                        "default: the one in the source directory, if any")


@command("convert", _convert_args)
def cmd_convert(args: argparse.Namespace, overrides: list[str]) -> int:
    """Convert weights between Hugging Face directories (GPT-2 and the Llama family) and mtnlg checkpoints, or
    upcycle a dense checkpoint into a mixture of experts."""
    from mtnlg.checkpoint.convert import from_hf, to_hf, upcycle

    if args.upcycle:
        print(f"wrote {upcycle(args.upcycle, args.out, args.upcycle_experts, overrides, args.overwrite)}")
        return 0
    no_overrides(overrides)
    out = (from_hf if args.from_hf else to_hf)(args.from_hf or args.to_hf, args.out, args.tokenizer, args.overwrite)
    print(f"wrote {out}")
    if not any((out / name).exists() for name in ("tokenizer", "tokenizer.json")):
        print(f"note: {out} has no tokenizer (none in the source directory): give --tokenizer DIR "
              "here, or to generate and serve")
    return 0


# -- generate, serve, quantize ---------------------------------------------------------------------


def _generate_args(p: argparse.ArgumentParser) -> None:
    checkpoint_args(p)
    p.add_argument("--prompt", help="text to continue; without it, prompts are read from stdin, one per line")
    _sampling_args(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--truncate", action="store_true", help="drop the oldest prompt tokens if it is too long")
    kv_cache_args(p)
    speculative_args(p)
    field_flag(p, "parallel.tp", "--tp", type=int_in(1), use_default=True,
               note="Launch with torchrun --nproc_per_node=TP (needs --prompt).")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, ... : the [generate] fields, over the checkpoint's values."""
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        field_flag(p, f"generate.{name}", "--" + name.replace("_", "-"), fallback="the checkpoint's")
    p.add_argument("--stop", action="append", help="stop string (repeatable); it is not printed")


@command("generate", _generate_args)
def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Generate text from a checkpoint: one --prompt, or prompts read from stdin (interactive).

    Defaults come from the checkpoint's [generate] section; --generate.field=value overrides it.
    """
    from mtnlg.checkpoint.directory import TOKENIZER_DIR, resolve_verified
    from mtnlg.checkpoint.model import load_config
    from mtnlg.generate.console import read_prompts, run_prompts

    if args.tp > 1:
        return _generate_tensor_parallel(args, overrides)
    checkpoint = resolve_verified(args.checkpoint)  # everything is checked before the model loads
    params = _sampling_params(args, load_config(checkpoint), overrides)
    if not args.tokenizer and not (checkpoint / TOKENIZER_DIR).is_dir():
        raise ConfigError(f"{checkpoint} has no {TOKENIZER_DIR}/ directory: text prompts need a tokenizer: give "
                          "--tokenizer DIR, or store one with `mtnlg convert ... --tokenizer DIR`")
    engine = load_engine(checkpoint, args, max_batch_size=1)  # prompts run one at a time
    prompts = [args.prompt] if args.prompt is not None else read_prompts(sys.stdin)
    run_prompts(engine, prompts, params, stream=args.stream, truncate=args.truncate)
    if engine.speculation is not None:
        print(engine.speculation.summary(), file=sys.stderr)
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    checkpoint_args(p)
    p.add_argument("--system", help="system prompt: instructions the whole conversation starts with")
    _sampling_args(p)


@command("chat", _chat_args)
def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> int:
    """Chat with a checkpoint in the terminal: each line you type is a message, the answer streams.

    /reset starts a new conversation, /exit (or end of input) quits; input may be piped. Messages
    are rendered with the checkpoint's chat template (or the default one); sampling defaults come
    from its [generate] section, as for generate.
    """
    from mtnlg.checkpoint.directory import resolve_verified
    from mtnlg.checkpoint.model import load_config
    from mtnlg.generate.console import chat, read_prompts

    checkpoint = resolve_verified(args.checkpoint)
    params = _sampling_params(args, load_config(checkpoint), overrides)
    engine = load_engine(checkpoint, args, max_batch_size=1)
    chat(engine, params, read_prompts(sys.stdin), system=args.system)
    return 0


def _sampling_params(args: argparse.Namespace, config: object, overrides: list[str]) -> object:
    """The checkpoint's [generate] defaults, then --generate.* overrides, then the flags given."""
    from mtnlg.generate.console import sampling_params

    return sampling_params(config, overrides, stop=args.stop, **given_fields(args, "generate"))


def _generate_tensor_parallel(args: argparse.Namespace, overrides: list[str]) -> int:
    """``torchrun --nproc_per_node=TP -m mtnlg generate --tp TP``: each rank runs the engine on its
    shard and samples the same tokens (seeded per sequence); rank 0 prints."""
    from mtnlg.cli.engine import tensor_parallel_limits
    from mtnlg.config import ParallelConfig
    from mtnlg.generate.console import run_prompts
    from mtnlg.generate.engine import Engine
    from mtnlg.generate.load import load_parallel_for_inference
    from mtnlg.parallel.dims import destroy_distributed

    tensor_parallel_limits(args)
    if args.prompt is None:
        raise ConfigError("--tp needs --prompt: every rank must generate from the same prompt")
    model, cfg, tokenizer, dims = load_parallel_for_inference(args.checkpoint, ParallelConfig(tp=args.tp),
                                                              context_override(args))
    try:
        tokenizer = cli_tokenizer(args, tokenizer, cfg.model.vocab_size)
        engine = Engine(model, tokenizer, config=cfg)
        params = _sampling_params(args, cfg, overrides)
        with open(os.devnull, "w") as devnull:
            run_prompts(engine, [args.prompt], params, stream=args.stream, truncate=args.truncate,
                        out=sys.stdout if dims.is_main else devnull)
    finally:
        destroy_distributed()
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    checkpoint_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int_in(1, 65535), default=8000, help="TCP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MTNLG_API_KEY; none if unset)")
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the checkpoint's name)")
    p.add_argument("--max-batch-size", type=int_in(1), default=8, help="sequences decoded together at most")
    kv_cache_args(p)
    speculative_args(p)
    p.add_argument("--max-body-bytes", type=int_in(1), default=1 << 20,
                   help="largest request body accepted, in bytes (default 1 MiB; larger ones get 413)")
    p.add_argument("--max-queued-sequences", type=int_in(1), default=256, metavar="N",
                   help="sequences that may wait for a row (default 256); a request past it gets 503 + Retry-After")
    p.add_argument("--request-timeout", type=_seconds, metavar="S",
                   help="a request still generating after S seconds is stopped and answered 504 (default: no limit)")
    p.add_argument("--header-timeout", type=_seconds, default=10.0, metavar="S",
                   help="a connection's first request head must arrive within S seconds, else 408 (default 10)")
    p.add_argument("--body-timeout", type=_seconds, default=30.0, metavar="S",
                   help="a request body must arrive within S seconds of its head, else 408 (default 30)")
    p.add_argument("--max-connections", type=int_in(1), default=1024, metavar="N",
                   help="open connections at most, unfinished ones included; more get 503 (default 1024)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name to answer (repeatable); on loopback localhost, 127.0.0.1 and [::1] always are, "
                        "other names get 400 (DNS rebinding); elsewhere every name is answered unless some are given")
    field_flag(p, "parallel.tp", "--tp", type=int_in(1), use_default=True,
               note="Launch with torchrun --nproc_per_node=TP: rank 0 serves, every rank runs its shard.")
    field_flag(p, "parallel.timeout_s", "--rank-timeout", use_default=True, metavar="S",
               note="With --tp: a rank silent this long (dead or hung) stops the server.")


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a number of seconds > 0")
    return value


@command("serve", _serve_args)
def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """Serve a checkpoint over HTTP: OpenAI-compatible /v1/completions, Megatron's PUT /api, /health.

    Under torchrun with --tp N, rank 0 serves and every rank runs the model's shard."""
    from mtnlg.checkpoint.directory import resolve_verified
    from mtnlg.serve.app import API_KEY_ENV, serve
    from mtnlg.util import dist as rank_info

    no_overrides(overrides)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        where = "--api-key" if args.api_key is not None else f"${API_KEY_ENV}"
        raise ConfigError(f"{where} is empty: give a real key, or none (unset it) to serve without authentication")
    if args.tp > 1 or rank_info.world_size() > 1:
        from mtnlg.cli.serve_parallel import serve_tensor_parallel

        return serve_tensor_parallel(args, api_key, listen, lambda engine: server_app(engine, args, api_key),
                                     lambda found, vocab: cli_tokenizer(args, found, vocab), context_override(args))
    checkpoint = resolve_verified(args.checkpoint)
    sock = listen(args.host, args.port)  # a port that is taken fails now, not after the model loaded
    engine = load_engine(checkpoint, args, max_batch_size=args.max_batch_size)
    serve(server_app(engine, args, api_key), args.host, args.port, sock=sock)
    return 0


def server_app(engine: object, args: argparse.Namespace, api_key: str | None) -> object:
    """The app ``mtnlg serve``'s flags ask for, around ``engine``."""
    from mtnlg.serve.app import API_KEY_ENV, create_app
    from mtnlg.serve.connection import ConnectionLimits

    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mtnlg serve: warning: listening on {args.host} without an API key: anyone who can reach it "
              f"can use it (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    name = args.model_name or os.path.basename(os.path.abspath(args.checkpoint))
    limits = ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                              max_connections=args.max_connections)
    return create_app(engine, api_key=api_key, model_name=name, max_body_bytes=args.max_body_bytes,
                      max_queued_sequences=args.max_queued_sequences, request_timeout_s=args.request_timeout,
                      allowed_hosts=_allowed_hosts(args.host, args.allowed_host), limits=limits)


def _allowed_hosts(host: str, given: list[str]) -> tuple[str, ...] | None:
    """The Host names to answer: on loopback its own names and those given; elsewhere those given,
    or any (None) if none are."""
    from mtnlg.serve.middleware import LOOPBACK_HOSTS

    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return (*LOOPBACK_HOSTS, host, *given)
    return tuple(given) or None


def listen(host: str, port: int) -> object:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="fp32 checkpoint directory, or a run directory")
    p.add_argument("--out", required=True,
                   help="directory for the quantized checkpoint (new or empty; see --overwrite)")
    p.add_argument("--dtype", choices=["int8", "int4"], default="int8",
                   help="int8: per-row int8 weights (default); int4: weight-only 4-bit, a scale and offset per group")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=128,
                   help="int4: input columns per scale and offset (default 128; a layer whose input count it "
                        "does not divide uses the largest smaller one that does)")
    overwrite_arg(p, "a quantized checkpoint of the same --dtype")


@command("quantize", _quantize_args)
def cmd_quantize(args: argparse.Namespace, overrides: list[str]) -> int:
    """Quantize a checkpoint's Linear layers (and output layer) to int8 or int4; generate/serve load it as is."""
    from mtnlg.generate.quantize import quantize_checkpoint

    no_overrides(overrides)
    print(f"wrote {quantize_checkpoint(args.checkpoint, args.out, args.overwrite, args.dtype, args.group_size)}")
    return 0


# -- evaluate --------------------------------------------------------------------------------------


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    checkpoint_args(p)
    p.add_argument("--task", required=True, choices=["perplexity", "cloze", "choice"],
                   help="perplexity of documents; cloze: predict a passage's last word; choice: multiple choice")
    p.add_argument("--data", required=True, help="JSONL file (formats: docs/evaluation.md); "
                   "perplexity also takes a plain-text file or an indexed dataset prefix")
    p.add_argument("--shots", type=int_in(0), default=0, help="solved examples before each item (cloze, choice)")
    p.add_argument("--fewshot-data", metavar="FILE", help="JSONL file the few-shot examples are drawn from")
    p.add_argument("--seed", type=int_in(0), default=0, help="seed of the few-shot draws")
    p.add_argument("--stride", type=int_in(1), help="perplexity: tokens between window starts "
                   "(default: the context length - 1, which reads each token once)")
    p.add_argument("--prepend-eod", action="store_true",
                   help="perplexity: score each document's first token too, given <|endoftext|>")
    json_key_arg(p, "perplexity: ")
    field_flag(p, "data.split", "--split", use_default=True, note="For an indexed dataset.")
    p.add_argument("--split-name", choices=["train", "valid", "test"], default="valid",
                   help="indexed dataset: the split to score (default valid)")
    p.add_argument("--batch-size", type=int_in(1), default=8, help="sequences scored together (default 8)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON to FILE")
    quiet_arg(p)


@command("evaluate", _evaluate_args)
def cmd_evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Evaluate a checkpoint: perplexity (token NLL, bits per byte), cloze accuracy or multiple choice, few-shot."""
    from mtnlg.eval.evaluate import EvalSpec, Scorer, evaluate, format_table, read_task

    no_overrides(overrides)
    spec = EvalSpec(args.task, args.data, args.shots, args.fewshot_data, args.seed, args.stride, args.prepend_eod,
                    args.json_key, args.split, args.split_name)
    data = read_task(spec)  # bad data fails before the model loads
    scorer = Scorer.from_checkpoint(args.checkpoint, args.quantize, args.device, args.batch_size, args.tokenizer,
                                    progress=not args.quiet, context=context_override(args))
    results = {"checkpoint": args.checkpoint, **evaluate(scorer, spec, data)}
    if args.out:
        write_json(args.out, results, indent=2)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0
