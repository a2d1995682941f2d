"""Terminal generation (``mtnlg generate``): sampling settings from the checkpoint and flags,
one prompt or an interactive session, printed whole or streamed token by token; and a terminal
chat (``mtnlg chat``) through the checkpoint's chat template."""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from mtnlg.config import Config, ConfigError, parse_overrides, set_field
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.generate.engine import Completion, Engine, Request, SamplingParams


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


def chat(
    engine: Engine,
    params: SamplingParams,
    lines: Iterable[str],
    system: str | None = None,
    out: TextIO | None = None,
) -> list[dict[str, str]]:
    """A conversation in the terminal (``mtnlg chat``): each line is a user message, answered as it
    is generated; ``/reset`` starts over (keeping the system prompt), ``/exit`` or the end of input
    ends it. Returns the conversation.

    The messages are rendered by the tokenizer's chat template and the answer ends at its end
    marker. When the conversation outgrows the context, its oldest exchanges are dropped (the
    system prompt stays), so a long chat goes on instead of failing."""
    out = out or sys.stdout
    template = ChatTemplate.of(engine.tokenizer) if engine.tokenizer is not None else ChatTemplate()
    try:
        params = dataclasses.replace(params, stop=[*params.stop, template.end]).validate(engine.vocab_size)
    except ValueError as exc:
        raise ConfigError(f"{exc} (in a chat, one of them is the end-of-turn marker {template.end})") from None
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    for line in lines:
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(opening)
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not line.strip():
            continue
        try:
            turn = _fit(engine, template, [*messages, {"role": "user", "content": line}], params)
        except ValueError as exc:
            print(f"error: {exc}", file=out, flush=True)
            continue
        answer = Completion(turn.request.prompt)
        for event in engine.run([turn.request]):
            answer.add(event)
            print(event.text, end="", file=out, flush=True)
        print(file=out, flush=True)
        messages = [*turn.messages, {"role": "assistant", "content": answer.text}]
    return messages


@dataclasses.dataclass
class _Turn:
    request: Request
    messages: list[dict[str, str]]  # what the request renders (the oldest exchanges may be gone)


def _fit(engine: Engine, template: ChatTemplate, messages: list[dict[str, str]], params: SamplingParams) -> _Turn:
    """The request for the assistant's next turn, dropping the oldest user/assistant exchanges
    until the conversation leaves room for ``params.max_new_tokens``."""
    template.render(messages)  # a bad message (one with a chat marker) is an error before anything is dropped
    head = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    while True:
        ids = engine.encode(template.render(head + turns), specials=template.special_tokens)
        try:
            return _Turn(engine.request(ids, params), head + turns)
        except ValueError:
            if len(turns) > 1:
                turns = turns[2:]
                continue
            room = engine.seq_len - len(ids)  # the question alone: answer in what is left
            if room < 1:
                raise
            return _Turn(engine.request(ids, dataclasses.replace(params, max_new_tokens=room)), head + turns)
