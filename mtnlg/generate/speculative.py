"""Speculative decoding: cheap guesses of a row's next k tokens, checked by the target in one forward.

A proposer guesses up to k tokens per row: ``NgramProposer`` looks the row's last few tokens up
earlier in its own prompt and output and proposes what followed them there (prompt lookup; no
second model), ``DraftProposer`` runs a small model with the same tokenizer. The target then
runs once over the newest token and the guesses, (B, k + 1) positions, and keeps the longest
prefix of guesses it agrees with plus one token of its own, so a step makes 1 to k + 1 tokens.

It is lossless. A greedy row keeps a guess exactly when it is the target's argmax there, so its
tokens are those of decoding without speculation. A sampled row uses the rejection sampling of
Leviathan et al. 2023 / Chen et al. 2023: guess x with draft probability q(x) is kept with
probability min(1, p(x) / q(x)) (an n-gram guess has q(x) = 1), the first rejected one is
replaced by a draw from the normalised max(p - q, 0), and a row whose guesses are all kept draws
one more token from p; p is the very distribution the plain step samples (temperature, top-k,
top-p: ``sampling.filtered_logits``), so each token follows the target's distribution. Seeded
sampled text is therefore distributed as without speculation, but not the same text.

All rows of a batch share the cache's length, so after verifying, the batch keeps the fewest
tokens any row made (m >= 1) and rolls the cache back to them (``truncate``); the tokens other
rows verified beyond m are dropped and guessed again. Cutting a row's run short where another
row ended is a stopping time of that row's draws, so the distribution stays exact. The cache is
used only through ``length``, the model's ``update``/``advance`` and ``truncate``, so any cache
with those works. Rows that ask for log-probabilities or a repetition penalty make their batch
decode plainly (their per-position settings are not reproduced here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from mtnlg.generate.decoder import Decoder, _failed, _guarded
from mtnlg.generate.sampling import filtered_logits, make_generator, sample
from mtnlg.generate.sequence import Row, TokenEvent
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache

KINDS = ("none", "ngram", "draft")
DEFAULT_TOKENS = 4  # guesses per step: n-gram guesses cost one target position each, so a few


class Proposer(Protocol):
    def propose(
        self, rows: list[Row], histories: list[list[int]], settings: dict, k: int, state: dict
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        """Up to ``k`` guesses per row, and their draft distributions (B, k, V) or None when each
        guess is certain (q = 1 on it). ``state`` is this decoder's, kept between steps."""
        ...


@dataclass
class Speculation:
    """An engine's speculative decoding: its proposer, ``k``, and counts over all its batches (read
    by the server's metrics and ``mtnlg generate``)."""

    proposer: Proposer
    k: int = DEFAULT_TOKENS
    kind: str = "ngram"
    counts: dict = field(default_factory=lambda: {"steps": 0, "rows": 0, "proposed": 0, "accepted": 0,
                                                          "tokens": 0})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.k}")

    def attach(self, decoder: Decoder) -> SpeculativeStep:
        return SpeculativeStep(self, decoder)

    def acceptance_rate(self) -> float:
        """Guesses kept / guesses made (0 before any)."""
        return self.counts["accepted"] / self.counts["proposed"] if self.counts["proposed"] else 0.0

    def summary(self) -> str:
        c = self.counts
        per_step = c["tokens"] / c["rows"] if c["rows"] else 0.0
        return (f"speculative ({self.kind}, k={self.k}): {c['accepted']} of {c['proposed']} proposed tokens accepted "
                f"({100 * self.acceptance_rate():.1f}%), {per_step:.2f} tokens per sequence per verifying forward")


class SpeculativeStep:
    """One decoder's speculative steps: ``step`` replaces the plain step, or returns None to leave
    it to the plain one (nothing guessed, settings it does not reproduce, no room for guesses)."""

    def __init__(self, speculation: Speculation, decoder: Decoder) -> None:
        self.speculation, self.decoder = speculation, decoder
        self.state: dict = {}  # the proposer's, per row

    def step(self) -> list[TokenEvent] | None:
        b, engine = self.decoder.batch, self.decoder.engine
        if b is None or not b.rows or any(r.params.logprobs is not None or r.params.repetition_penalty != 1
                                          for r in b.rows):
            return None
        k = min(self.speculation.k, min(r.params.max_new_tokens - r.n_generated for r in b.rows) - 1)
        if k < 1:
            return None
        histories = [r.request.prompt + r.tokens for r in b.rows]
        guesses, q = self.speculation.proposer.propose(b.rows, histories, b.settings, k, self.state)
        if not any(guesses):
            return None
        width = max(len(g) for g in guesses)
        fed = torch.tensor([[h[-1], *g] + [0] * (width - len(g)) for h, g in zip(histories, guesses, strict=True)],
                           device=b.fed.device)
        positions = b.next_pos.unsqueeze(1) + torch.arange(width + 1, device=fed.device)
        start = b.cache.length
        try:
            logits = engine.model(fed, **b.model_kwargs(positions))[:, :, : engine.vocab_size].float()
        except Exception as exc:  # not any one row's fault: every row ends with the error
            events = [_failed(r, exc) for r in b.rows]
            b.retain([])
            return events
        probs = _sampled_probabilities(logits, b.settings)
        made = [_guarded_verify(r, i, logits, guesses, q, probs) for i, r in enumerate(b.rows)]
        m = min((len(t) for t in made if isinstance(t, list)), default=1)
        b.cache.truncate(start + m)
        return self._emit(made, guesses, m)

    def _emit(self, made: list, guesses: list[list[int]], m: int) -> list[TokenEvent]:
        """Each row's first ``m`` tokens as events (fewer if it finishes); the batch moves on by ``m``."""
        b, engine, c = self.decoder.batch, self.decoder.engine, self.speculation.counts
        eod = engine.tokenizer.eod_id if engine.tokenizer is not None else None
        events, finished, last = [], set(), []
        for row, tokens, g in zip(b.rows, made, guesses, strict=True):
            if isinstance(tokens, TokenEvent):  # its verification failed
                events.append(tokens)
                finished.add(row.index)
                last.append(0)
                continue
            c["proposed"], c["accepted"] = c["proposed"] + len(g), c["accepted"] + len(tokens) - 1
            for token in tokens[:m]:
                event = _guarded(row, lambda r=row, t=token: r.step(t, None, None, eod))
                events.append(event)
                if event.finish_reason is not None:
                    finished.add(row.index)
                    break
            b.seen[len(last), tokens[:m]] = True
            last.append(tokens[m - 1])
        c["steps"], c["rows"], c["tokens"] = c["steps"] + 1, c["rows"] + len(b.rows), c["tokens"] + len(events)
        b.fed, b.next_pos = torch.tensor(last, device=b.fed.device).unsqueeze(1), b.next_pos + m
        b.retain([i for i, r in enumerate(b.rows) if r.index not in finished])
        self.decoder.stats["decode_tokens"] += len(events)
        return events


def _sampled_probabilities(logits: torch.Tensor, settings: dict) -> torch.Tensor | None:
    """The target's distributions (B, k + 1, V) at every verified position (None if every row is
    greedy; a greedy row's are not used), for all rows in one call."""
    if not bool((settings["temperature"] > 0).any()):
        return None
    B, T, V = logits.shape
    repeated = {name: v.repeat_interleave(T) for name, v in settings.items()}
    return target_probabilities(logits.reshape(B * T, V), repeated).reshape(B, T, V)


def _guarded_verify(row: Row, i: int, logits: torch.Tensor, guesses: list[list[int]], q: torch.Tensor | None,
                    probs: torch.Tensor | None) -> list[int] | TokenEvent:
    """``verify`` for row ``i``, or its error event."""
    try:
        p = None if probs is None or row.params.temperature == 0 else probs[i]
        return verify(logits[i], guesses[i], None if q is None else q[i], p, row.generator)
    except Exception as exc:
        return _failed(row, exc)


def verify(logits: torch.Tensor, guesses: list[int], q: torch.Tensor | None, p: torch.Tensor | None,
           generator: torch.Generator) -> list[int]:
    """The tokens a row makes from the target's ``logits`` (k + 1, V) at its newest token and its
    ``guesses``: the guesses kept and one token of the target's own. A greedy row has no ``p``;
    a sampled one's ``p`` (k + 1, V) are the target's distributions there (``target_probabilities``)
    and ``q`` (k, V) the draft's (None: each guess was certain)."""
    n = len(guesses)
    if p is None:
        target = logits[: n + 1].argmax(dim=-1).tolist()
        kept = 0
        while kept < n and guesses[kept] == target[kept]:
            kept += 1
        return [*guesses[:kept], target[kept]]
    for j, x in enumerate(guesses):
        qx = 1.0 if q is None else float(q[j, x])
        if float(_uniform(generator)) * qx < float(p[j, x]):  # kept with probability min(1, p/q)
            continue
        residual = p[j].clone()
        if q is None:
            residual[x] = 0.0
        else:
            residual = (residual - q[j].to(residual)).clamp(min=0)
        if not float(residual.sum()) > 0:  # p <= q everywhere only when p == q: nothing to correct
            residual = p[j]
        return [*guesses[:j], _draw(residual, generator)]
    return [*guesses, _draw(p[n], generator)]


def target_probabilities(logits: torch.Tensor, settings: dict) -> torch.Tensor:
    """softmax of the filtered logits (N, V), float64: what the plain step samples from; the
    settings are (N,) or (1,) tensors."""
    N = logits.shape[0]
    x = filtered_logits(logits, *(settings[name].expand(N) for name in ("temperature", "top_k", "top_p")))
    return x.double().softmax(dim=-1)


def _uniform(generator: torch.Generator) -> torch.Tensor:
    return torch.rand((), generator=generator, device=generator.device)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from the (unnormalised) ``probs`` (V,)."""
    return int(sample(probs.log().unsqueeze(0), _uniform(generator).reshape(1))[0])


# -- proposers ----------------------------------------------------------------------------------


def lookup(history: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: the tokens that followed an earlier occurrence of ``history``'s last n tokens
    (the longest n from ``max_ngram`` down to ``min_ngram`` that occurs), at most ``k``. Of the
    occurrences, the latest that is followed by ``k`` tokens, else the earliest (the longest run)."""
    t = torch.tensor(history)
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        starts = (t[:-1].unfold(0, n, 1) == t[-n:]).all(dim=1).nonzero().squeeze(1)  # i: t[i:i+n] matches
        if len(starts):
            full = starts[starts + n + k <= len(history)]
            i = int(full[-1]) if len(full) else int(starts[0])
            return history[i + n : i + n + k]
    return []


@dataclass
class NgramProposer:
    """Guesses from the row's own prompt and output: code edits, quotes and summaries repeat it."""

    max_ngram: int = 3
    min_ngram: int = 1

    def propose(self, rows: list[Row], histories: list[list[int]], settings: dict, k: int,
                state: dict) -> tuple[list[list[int]], None]:
        return [lookup(h, k, self.max_ngram, self.min_ngram) for h in histories], None


class _DraftRow:
    """One row's draft cache and the tokens in it."""

    def __init__(self, model: GPT, seed: int) -> None:
        self.cache = KVCache(len(model.blocks), model.cfg.seq_len)
        self.cached: list[int] = []
        self.generator = make_generator(seed)

    def sync(self, history: list[int]) -> None:
        """Roll the cache back to the longest prefix it shares with ``history`` (less its last token)."""
        n = min(len(self.cached), len(history) - 1)
        same = (torch.tensor(self.cached[:n]) == torch.tensor(history[:n])).int().cumprod(0)
        keep = int(same.sum()) if n else 0
        self.cache.truncate(keep)
        del self.cached[keep:]


class DraftProposer:
    """Guesses from a small model with the target's tokenizer, each row decoded on its own cache."""

    def __init__(self, model: GPT, vocab_size: int) -> None:
        self.model, self.vocab_size = model.eval(), vocab_size

    @torch.inference_mode()
    def propose(self, rows: list[Row], histories: list[list[int]], settings: dict, k: int,
                state: dict) -> tuple[list[list[int]], torch.Tensor]:
        for gone in set(state) - {r.index for r in rows}:
            del state[gone]
        device = next(self.model.parameters()).device
        q = torch.zeros(len(rows), k, self.vocab_size, dtype=torch.float64)
        guesses = []
        for i, (row, history) in enumerate(zip(rows, histories, strict=True)):
            if row.index not in state:
                state[row.index] = _DraftRow(self.model, int(torch.randint(0, 2**62, (), generator=row.generator)))
            d, s = state[row.index], {name: v[i : i + 1].cpu() for name, v in settings.items()}
            d.sync(history)
            feed, guess = history[len(d.cached) :], []
            for j in range(max(0, min(k, self.model.cfg.seq_len - len(history)))):
                logits = self.model(torch.tensor([feed], device=device), kv_cache=d.cache)[0, -1:, : self.vocab_size]
                d.cached += feed
                if float(s["temperature"]) == 0:
                    token = int(logits.argmax())
                else:
                    q[i, j] = target_probabilities(logits.float().cpu(), s)[0]
                    token = _draw(q[i, j], d.generator)
                guess.append(token)
                feed = [token]
            guesses.append(guess)
        return guesses, q


def make_speculation(kind: str, k: int | None = None, draft: tuple[GPT, object] | None = None,
                     target_vocab: int | None = None, target_tokenizer: object = None) -> Speculation | None:
    """The ``Speculation`` for ``--speculative KIND`` (None for "none"); ``draft`` is (model, tokenizer)."""
    if kind not in KINDS:
        raise ValueError(f"speculative must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "none":
        return None
    k = DEFAULT_TOKENS if k is None else k
    if kind == "ngram":
        return Speculation(NgramProposer(), k, kind)
    if draft is None:
        raise ValueError("speculative 'draft' needs a draft model (--draft-checkpoint DIR)")
    model, tokenizer = draft
    check_same_tokenizer(model.cfg.vocab_size, tokenizer, target_vocab, target_tokenizer)
    return Speculation(DraftProposer(model, model.cfg.vocab_size), k, kind)


def check_same_tokenizer(vocab: int, tokenizer: object, target_vocab: int | None, target_tokenizer: object) -> None:
    """Refuse a draft whose tokens are not the target's: its guesses would be other tokens' ids."""
    if target_vocab is not None and vocab != target_vocab:
        raise ValueError(f"the draft model's vocabulary has {vocab} tokens, the target's {target_vocab}: "
                         "speculative decoding needs a draft with the target's tokenizer")
    if tokenizer is not None and target_tokenizer is not None:
        if tokenizer.hf.get_vocab(with_added_tokens=True) != target_tokenizer.hf.get_vocab(with_added_tokens=True):
            raise ValueError("the draft model's tokenizer differs from the target's (other token ids): "
                             "speculative decoding needs a draft with the target's tokenizer")


def speculation_for(engine: object, kind: str, k: int | None = None,
                    draft_checkpoint: str | None = None) -> Speculation | None:
    """``--speculative KIND --num-speculative-tokens K --draft-checkpoint DIR`` for ``engine``: the
    draft is loaded onto the engine's device and checked to share its tokenizer."""
    from mtnlg.generate.load import load_for_inference

    if draft_checkpoint is not None and kind != "draft":
        raise ValueError(f"--draft-checkpoint is used only with --speculative draft (not {kind!r})")
    draft = None
    if kind == "draft":
        if draft_checkpoint is None:
            raise ValueError("--speculative draft needs --draft-checkpoint DIR (a small model with the same tokenizer)")
        model, _, tokenizer = load_for_inference(draft_checkpoint, None, str(engine.device), 1)
        draft = (model, tokenizer)
    try:
        return make_speculation(kind, k, draft, engine.vocab_size, engine.tokenizer)
    except ValueError as exc:
        raise ValueError(f"--draft-checkpoint {draft_checkpoint}: {exc}" if draft else str(exc)) from None
