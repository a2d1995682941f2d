"""One running batch of the engine: its rows' tensors (``_Batch``) and the steps over it (``Decoder``).

A ``Decoder`` is the whole state of a batch in progress and owns every row in it: ``add``
prefills new requests (into an empty decoder, or joining a running batch between steps),
``step`` decodes one token per live row, ``cancel`` retires rows. Rows that finish leave at
once. Each request gets an event index from the decoder (``indices`` of ``add``); the
caller maps indices to its clients, so the decoder never touches a caller's objects.

A failure is confined to the rows it concerns: a request whose prefill or sampling raises
gets an event with ``finish_reason="error"`` and leaves the batch, and the others go on (when
a step of the whole batch fails, the batched work is retried row by row to find the culprit).
Only a failure of the model's forward pass over the batch ends every row, each with the error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import torch

from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.sampling import apply_repetition_penalty, draw_uniforms, select_tokens
from mtnlg.generate.sequence import Request, Row, SamplingParams, TokenEvent
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache


class Engine(Protocol):
    """What a decoder needs of the engine that made it (``mtnlg.generate.engine.Engine``)."""

    model: GPT
    tokenizer: Tokenizer
    device: torch.device
    vocab_size: int
    max_batch_size: int
    seq_len: int

    def fits(self, requests: Sequence[Request]) -> bool: ...

    def seed_for(self, params: SamplingParams) -> int: ...


LOGPROB_FLOOR = -9999.0  # a non-finite log-probability (from non-finite logits) is reported as this
T = TypeVar("T")


class _Batch:
    """The live rows' tensors: KV cache, key mask, positions, next input, sampling settings.

    Built by prefilling every prompt token but the last (their logits are not needed); the last
    one is the first decode step's input. Rows are left-padded to the longest prompt; the mask
    hides padding and ``next_pos`` holds each row's own position.
    """

    def __init__(self, engine: Engine, rows: list[Row]) -> None:
        device = engine.device
        self.rows = rows
        lengths = torch.tensor([len(r.request.prompt) for r in rows], device=device)
        width = int(lengths.max())
        capacity = width + max(r.params.max_new_tokens for r in rows)
        pad = width - lengths  # (B,)
        self.padded = bool(pad.any())
        prompt = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        self.seen = torch.zeros(len(rows), engine.vocab_size, dtype=torch.bool, device=device)  # for the penalty
        for i, r in enumerate(rows):
            ids = torch.tensor(r.request.prompt, device=device)
            prompt[i, int(pad[i]) :] = ids
            self.seen[i, ids] = True
        self.mask = torch.arange(capacity, device=device).unsqueeze(0) >= pad.unsqueeze(1)  # (B, capacity)
        self.cache = KVCache(len(engine.model.blocks), capacity)
        if width > 1:
            positions = (torch.arange(width - 1, device=device) - pad.unsqueeze(1)).clamp(min=0)  # (B, T)
            engine.model.hidden_states(prompt[:, :-1], **self.model_kwargs(positions))
        self.fed = prompt[:, -1:]  # (B, 1): each row's next input
        self.next_pos = lengths - 1  # (B,): its position
        self.settings = {
            name: torch.tensor([getattr(r.params, name) for r in rows], device=device)
            for name in ("temperature", "top_k", "top_p", "repetition_penalty")
        }

    def model_kwargs(self, positions: torch.Tensor) -> dict:
        """Cache, and mask and positions (B, T) for the next fed tokens (not needed without padding)."""
        if not self.padded:
            return {"kv_cache": self.cache}
        S = self.cache.length + positions.shape[1]
        return {"kv_cache": self.cache, "attention_mask": self.mask[:, :S], "position_ids": positions}

    def merge(self, other: _Batch) -> None:
        """Append ``other``'s rows, prefilled to a cache no longer than ours: their keys and values go
        to the last cache slots, the slots before them masked like left padding."""
        B, n, L, Ln = len(self.rows), len(other.rows), self.cache.length, other.cache.length
        shift = L - Ln
        self.cache.append_rows(other.cache, n, L + max(r.params.max_new_tokens for r in other.rows))
        capacity = self.cache.max_len
        mask = torch.ones(B + n, capacity, dtype=torch.bool, device=self.mask.device)
        mask[:B, :L] = self.mask[:, :L]
        mask[B:, :shift] = False
        mask[B:, shift:L] = other.mask[:, :Ln]
        self.mask, self.padded = mask, True
        self.rows += other.rows
        self.fed, self.next_pos = torch.cat([self.fed, other.fed]), torch.cat([self.next_pos, other.next_pos])
        self.settings = {k: torch.cat([v, other.settings[k]]) for k, v in self.settings.items()}
        self.seen = torch.cat([self.seen, other.seen])

    def retain(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (e.g. drop finished ones)."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.select(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.fed, self.seen = self.fed[index], self.seen[index]
        self.settings = {k: v[index] for k, v in self.settings.items()}


class Decoder:
    """One batch in progress: ``add`` requests (also while it runs), ``step`` until it is empty."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batch: _Batch | None = None
        self.added = 0  # requests ever added: the next one's event index
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0}  # timings of this batch
        speculation = getattr(engine, "speculation", None)  # mtnlg.generate.speculative.Speculation
        self.speculative = speculation.attach(self) if speculation is not None else None

    def __len__(self) -> int:
        """Live rows."""
        return len(self.batch.rows) if self.batch is not None else 0

    def can_add(self, requests: Sequence[Request]) -> bool:
        """Whether ``requests`` can be added now: into an empty decoder if they ``fit`` together;
        into a running batch if rows are free, no prompt is longer than its cache, and every budget
        still fits the context."""
        engine = self.engine
        if self.batch is None or not self.batch.rows:
            return bool(requests) and engine.fits(requests)
        length = self.batch.cache.length
        return len(self) + len(requests) <= engine.max_batch_size and all(
            len(r.prompt) - 1 <= length and length + r.params.max_new_tokens <= engine.seq_len for r in requests
        )

    @torch.inference_mode()
    def add(self, requests: Sequence[Request]) -> tuple[list[int], list[TokenEvent]]:
        """Prefill ``requests`` (which must ``can_add``) and join them to the batch; returns their event
        indices and the events they end with at once (no token budget, or a failed prefill)."""
        if not self.can_add(requests):
            raise ValueError("these requests cannot join the batch now; check can_add first")
        t0 = time.perf_counter()
        engine = self.engine
        indices = list(range(self.added, self.added + len(requests)))
        self.added += len(requests)
        rows = [Row(i, r, engine.tokenizer, engine.seed_for(r.params)) for i, r in zip(indices, requests, strict=True)]
        events = [TokenEvent(r.index, None, "", finish_reason="length") for r in rows if r.params.max_new_tokens == 0]
        rows = [r for r in rows if r.params.max_new_tokens > 0]
        part, failed = _isolated(rows, lambda some: _Batch(engine, some))
        events += failed
        if part is not None:
            if self.batch is None or not self.batch.rows:
                self.batch = part
            else:
                self.batch.merge(part)
        self.stats["prefill_s"] += time.perf_counter() - t0
        return indices, events

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Feed each live row its newest token and choose its next one; finished rows leave."""
        b, engine = self.batch, self.engine
        if b is None or not b.rows:
            return []
        t0 = time.perf_counter()
        if self.speculative is not None and (events := self.speculative.step()) is not None:
            self.stats["decode_s"] += time.perf_counter() - t0
            return sorted(events, key=lambda e: e.index)  # stable: a row's tokens stay in order
        try:
            logits = engine.model(b.fed, **b.model_kwargs(b.next_pos.unsqueeze(1)))
            logits = logits[:, -1, : engine.vocab_size].float()
        except Exception as exc:  # not any one row's fault: every row ends with the error
            events = [_failed(r, exc) for r in b.rows]
            b.retain([])
            return events
        uniform = draw_uniforms([r.generator for r in b.rows])  # drawn once, whatever is retried below
        chosen, events = _isolated(b.rows, lambda rows: _choose(b, rows, logits, uniform))
        eod = engine.tokenizer.eod_id if engine.tokenizer is not None else None
        for row in b.rows:
            if row.index in (chosen or {}):
                events.append(_guarded(row, lambda r=row: r.step(*chosen[r.index], eod)))
        tokens = [(chosen or {}).get(r.index, (0,))[0] for r in b.rows]
        b.fed, b.next_pos = torch.tensor(tokens, device=b.fed.device).unsqueeze(1), b.next_pos + 1
        finished = {e.index for e in events if e.finish_reason is not None}
        b.retain([i for i, r in enumerate(b.rows) if r.index not in finished])
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["decode_tokens"] += len(events)
        return sorted(events, key=lambda e: e.index)

    def cancel(self, indices: set[int]) -> list[TokenEvent]:
        """Retire the live rows with these event indices (e.g. their client left)."""
        if self.batch is None or not indices:
            return []
        gone = [r for r in self.batch.rows if r.index in indices]
        if gone:
            self.batch.retain([i for i, r in enumerate(self.batch.rows) if r.index not in indices])
        return [TokenEvent(r.index, None, "", finish_reason="cancelled") for r in gone]

    def live(self) -> list[int]:
        """Event indices of the live rows."""
        return [r.index for r in self.batch.rows] if self.batch is not None else []


def _choose(b: _Batch, rows: list[Row], logits: torch.Tensor, uniform: torch.Tensor) -> dict[int, tuple]:
    """Sample the next token of each of ``rows``, with its log-probs when the row asked for them:
    {row index: (token, logprob, top)}. Marks the tokens seen, for the repetition penalty."""
    if len(rows) == len(b.rows):  # the usual case: no copies
        index: torch.Tensor | slice = slice(None)
    else:
        position = {r.index: i for i, r in enumerate(b.rows)}
        index = torch.tensor([position[r.index] for r in rows], dtype=torch.long, device=logits.device)
    s = {k: v[index] for k, v in b.settings.items()}
    x = logits[index]
    if bool((s["repetition_penalty"] != 1).any()):
        x = apply_repetition_penalty(x, b.seen[index], s["repetition_penalty"])
    chosen = select_tokens(x, s["temperature"], s["top_k"], s["top_p"], uniform[index])
    wanted = [r.params.logprobs for r in rows]
    picked: list[float | None] = [None] * len(rows)
    tops: list[dict | None] = [None] * len(rows)
    if any(k is not None for k in wanted):
        logp = torch.log_softmax(x, dim=-1).nan_to_num(nan=LOGPROB_FLOOR, posinf=0.0).clamp(min=LOGPROB_FLOOR)
        values = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        top_v, top_i = logp.topk(max(k or 0 for k in wanted), dim=-1)
        for j, k in enumerate(wanted):
            if k is not None:
                picked[j] = values[j]
                tops[j] = dict(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist(), strict=True))
    b.seen[index] = b.seen[index].scatter(1, chosen.unsqueeze(1), True)
    return {r.index: item for r, item in zip(rows, zip(chosen.tolist(), picked, tops, strict=True), strict=True)}


def _failed(row: Row, exc: BaseException) -> TokenEvent:
    return TokenEvent(row.index, None, "", finish_reason="error", error=f"{type(exc).__name__}: {exc}")


def _guarded(row: Row, work: Callable[[], TokenEvent]) -> TokenEvent:
    """``work()``, or the row's error event if it raises."""
    try:
        return work()
    except Exception as exc:
        return _failed(row, exc)


def _isolated(rows: list[Row], work: Callable[[list[Row]], T]) -> tuple[T | None, list[TokenEvent]]:
    """``work(rows)``; if it raises, find the rows it fails for by trying each alone, and run it on
    the rest together. Returns its result (None when no row is left) and an error event per failed row."""
    if not rows:
        return None, []
    try:
        return work(rows), []
    except Exception as exc:
        if len(rows) == 1:
            return None, [_failed(rows[0], exc)]
    bad: dict[int, Exception] = {}
    for row in rows:
        try:
            work([row])
        except Exception as exc:
            bad[row.index] = exc
    good = [r for r in rows if r.index not in bad]
    events = [_failed(r, bad[r.index]) for r in rows if r.index in bad]
    if not good:
        return None, events
    try:
        return work(good), events
    except Exception as exc:  # fails together, not alone: these rows end too
        return None, events + [_failed(r, exc) for r in good]
