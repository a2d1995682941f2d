"""One sequence being generated: its settings, its events, its result, and its text.

``SamplingParams`` are a request's settings; the engine turns each request into a ``Row`` that
samples from its own seeded generator, detokenizes incrementally (holding back text that might
still become a stop string or is an incomplete UTF-8 character) and decides when it is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream

from mtnlg.config import GenerateConfig
from mtnlg.config.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, OPTIONAL, SAMPLING
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.sampling import make_generator


@dataclass
class SamplingParams:
    """How one sequence is continued (the per-request settings). The defaults and ranges are
    ``mtnlg.config.sampling.SAMPLING``'s, the table GenerateConfig, the HTTP schema and the CLI read."""

    max_new_tokens: int = SAMPLING["max_new_tokens"].default
    temperature: float = SAMPLING["temperature"].default  # 0 means greedy
    top_k: int = SAMPLING["top_k"].default  # 0 disables
    top_p: float = SAMPLING["top_p"].default  # 1 disables
    repetition_penalty: float = SAMPLING["repetition_penalty"].default  # 1 disables
    seed: int | None = None  # None: drawn from the engine's seed stream
    stop: Sequence[str] = ()  # strings that end the completion (excluded from its text)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the k most likely
    ignore_eod: bool = False  # keep going past <|endoftext|> (benchmarks)

    @classmethod
    def from_config(cls, cfg: GenerateConfig, **overrides: object) -> SamplingParams:
        """Defaults from a config's [generate] section; ``overrides`` that are None are skipped."""
        base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in _PARAM_NAMES}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)  # type: ignore[arg-type]

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ValueError naming the first bad field (the message starts with its name). The ranges
        are ``SAMPLING``'s; ``top_k`` may not exceed ``vocab_size`` when it is given."""
        for name, setting in SAMPLING.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            setting.check(name, value)
        if vocab_size is not None and self.top_k > vocab_size:
            raise ValueError(f"top_k must be <= the vocabulary size {vocab_size} (0 disables), got {self.top_k}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
        return self


_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass
class Request:
    """One sequence to generate: prompt token ids and its settings (validated by ``Engine.request``)."""

    prompt: list[int]
    params: SamplingParams


@dataclass
class TokenEvent:
    """What one step produced for one row of the batch (``index`` = position in the request list)."""

    index: int
    token: int | None  # None on a final event that adds no token (end of document, cancel)
    text: str  # newly released text: held back while it might be the start of a stop string
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on the row's last event
    error: str | None = None  # with finish_reason "error": what failed (this row only; the batch goes on)


@dataclass
class Completion:
    """A finished sequence. ``text`` ends before any stop string; ``tokens`` exclude <|endoftext|>."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    error: str | None = None

    def add(self, event: TokenEvent) -> None:
        """Fold one of this sequence's events into the result."""
        if event.token is not None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                if self.logprobs is None or self.top_logprobs is None:
                    self.logprobs, self.top_logprobs = [], []
                self.logprobs.append(event.logprob)
                self.top_logprobs.append(event.top_logprobs or {})
        self.text += event.text
        if event.finish_reason is not None:
            self.finish_reason, self.error = event.finish_reason, event.error


class Detokenizer:
    """Turns a row's tokens into text as they come, releasing only text that is final.

    ``tokenizers``' ``DecodeStream`` decodes each token against a short prefix (not the whole
    sequence again) and withholds a token that ends in an incomplete UTF-8 character. Text is also
    held back while it ends in a prefix of a stop string; a stop string ends the text just before it.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.stream = DecodeStream(skip_special_tokens=False)
        self.undecoded: list[int] = []  # tokens the stream withholds (an incomplete character so far)
        self.released = 0  # characters of ``text`` already handed out
        self.text = ""
        self.longest_stop = max((len(s) for s in self.stop), default=0)

    def add(self, token: int) -> tuple[str, bool]:
        """Append ``token``; return (newly final text, whether a stop string was reached)."""
        if self.tokenizer is None:
            return "", False
        piece = self.stream.step(self.tokenizer.hf, token)
        if piece is None:
            self.undecoded.append(token)
            return "", False
        self.undecoded = []
        start = max(self.released, len(self.text) - self.longest_stop + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            self.text = self.text[:end]
            return self._release(end), True
        held = max((_partial_suffix(self.text, s) for s in self.stop), default=0)
        return self._release(max(len(self.text) - held, self.released)), False

    def flush(self) -> str:
        """Everything not yet released (the sequence is over); an incomplete character as U+FFFD."""
        if self.undecoded and self.tokenizer is not None:
            self.text += self.tokenizer.decode(self.undecoded)
            self.undecoded = []
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.released : end]
        self.released = end
        return out


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class Row:
    """Per-sequence decoding state."""

    def __init__(self, index: int, request: Request, tokenizer: Tokenizer | None, seed: int) -> None:
        self.index, self.request, self.params = index, request, request.params
        self.generator = make_generator(seed)
        self.detok = Detokenizer(tokenizer, self.params.stop)
        self.n_generated = 0
        self.tokens: list[int] = []  # generated so far (speculative proposals look them up)

    def step(self, token: int, logprob: float | None, top: dict | None, eod_id: int | None) -> TokenEvent:
        """Record the sampled ``token`` and say whether the row is done."""
        if token == eod_id and not self.params.ignore_eod:
            return TokenEvent(self.index, None, self.detok.flush(), finish_reason="stop")
        self.n_generated += 1
        self.tokens.append(token)
        text, stopped = self.detok.add(token)
        finish = "stop" if stopped else "length" if self.n_generated >= self.params.max_new_tokens else None
        if finish == "length":
            text += self.detok.flush()
        return TokenEvent(self.index, token, text, logprob, top, finish)
