"""Terminal generation (``mtnlg generate``): sampling settings from the checkpoint and flags,
one prompt or an interactive session, printed whole or streamed token by token."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from mtnlg.config import Config, ConfigError, parse_overrides, set_field
from mtnlg.generate.engine import Completion, Engine, SamplingParams


def sampling_params(config: Config | None, overrides: list[str], **flags: object) -> SamplingParams:
    """The checkpoint's [generate] section, then ``--generate.field=value`` overrides, then flags
    that were given (None means not given)."""
    cfg = copy.deepcopy(config) if config is not None else Config()
    for key, value in parse_overrides(overrides):
        if not key.startswith("generate."):
            raise ConfigError(f"--{key}: only --generate.* settings apply to generation")
        set_field(cfg, key, value, f"--{key}")
    cfg.generate.validate()
    try:
        vocab_size = config.model.vocab_size if config is not None else None  # top_k's bound
        return SamplingParams.from_config(cfg.generate, **flags).validate(vocab_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def read_prompts(stream: TextIO) -> Iterator[str]:
    """Prompts from ``stream``, one per line (``\\n`` in a line stands for a newline); a ``> ``
    prompt is shown when it is a terminal."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = stream.readline()
        if not line:
            return
        yield line.rstrip("\n").replace("\\n", "\n")


def run_prompts(
    engine: Engine,
    prompts: Iterable[str],
    params: SamplingParams,
    stream: bool = False,
    truncate: bool = False,
    out: TextIO | None = None,
) -> list[Completion]:
    """Print each prompt followed by its continuation; with ``stream``, as tokens are produced.

    ``out`` defaults to the ``sys.stdout`` of the call, not of the import (tests swap it)."""
    out = out or sys.stdout
    done = []
    for prompt in prompts:
        request = engine.request(prompt, params, truncate)
        completion = Completion(request.prompt)
        print(prompt, end="", file=out, flush=True)
        for event in engine.run([request]):
            completion.add(event)
            if stream:
                print(event.text, end="", file=out, flush=True)
        print(completion.text if not stream else "", file=out, flush=True)
        done.append(completion)
    return done
