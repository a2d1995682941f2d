"""One sequence being generated: its settings, its events, its result, and its text.

``SamplingParams`` are a request's settings; the engine turns each request into a ``Row`` that
samples from its own seeded generator, detokenizes incrementally (holding back text that might
still become a stop string or is an incomplete UTF-8 character) and decides when it is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mtnlg.config import GenerateConfig
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.sampling import make_generator

MAX_TOP_LOGPROBS = 20  # as many alternatives as OpenAI's chat API returns


@dataclass
class SamplingParams:
    """How one sequence is continued (the per-request settings; defaults come from GenerateConfig)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    repetition_penalty: float = 1.0  # 1 disables
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

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the first bad field."""
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0, "must be >= 0"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 means greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS, "must be None or 0..20"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")
        return self


_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass
class Request:
    """One sequence to generate: prompt token ids, its settings, and a cancellation probe."""

    prompt: list[int]
    params: SamplingParams
    cancelled: Callable[[], bool] | None = None  # polled every step, e.g. a disconnected client


@dataclass
class TokenEvent:
    """What one step produced for one row of the batch (``index`` = position in the request list)."""

    index: int
    token: int | None  # None on a final event that adds no token (end of document, cancel)
    text: str  # newly released text: held back while it might be the start of a stop string
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the row's last event


@dataclass
class Completion:
    """A finished sequence. ``text`` ends before any stop string; ``tokens`` exclude <|endoftext|>."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None

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
            self.finish_reason = event.finish_reason


class Detokenizer:
    """Turns a row's growing token list into text, releasing only text that is final.

    Text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or in
    a prefix of a stop string; a stop string ends the text just before it.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.released = 0  # characters of the decoded text already handed out
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Append ``token``; return (newly final text, whether a stop string was reached)."""
        if self.tokenizer is None:
            return "", False
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s, self.released) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            self.text = self.text[:end]
            return self._release(end), True
        safe = len(self.text.rstrip("\ufffd"))
        held = max((_partial_suffix(self.text[:safe], s) for s in self.stop), default=0)
        return self._release(max(safe - held, self.released)), False

    def flush(self) -> str:
        """Everything not yet released (the sequence is over)."""
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

    def cancelled(self) -> bool:
        return self.request.cancelled is not None and self.request.cancelled()

    def step(self, token: int, logprob: float | None, top: dict | None, eod_id: int | None) -> TokenEvent:
        """Record the sampled ``token`` and say whether the row is done."""
        if token == eod_id and not self.params.ignore_eod:
            return TokenEvent(self.index, None, self.detok.flush(), finish_reason="stop")
        self.n_generated += 1
        text, stopped = self.detok.add(token)
        finish = "stop" if stopped else "length" if self.n_generated >= self.params.max_new_tokens else None
        if finish == "length":
            text += self.detok.flush()
        return TokenEvent(self.index, token, text, logprob, top, finish)
