"""The decoder over the block KV cache: the same ``add`` / ``step`` / ``cancel`` API as ``Decoder``.

``add`` only queues requests (admission is by free blocks, see ``mtnlg.generate.scheduler``);
each ``step`` admits what fits, runs this step's prefill work (one forward per sequence chunk,
continuing from the blocks it already has: cached prefix blocks are never recomputed), then one
decode forward over every sequence that has finished its prefill. Decoding rows of different
lengths share a left-padded frame: each row's keys are gathered from its blocks into the last
slots, the slots before them read the scratch block and are masked, and ``position_ids`` give
each row its own positions, so a row decodes as it would alone. Sampling, events and failure
isolation are the contiguous decoder's (``mtnlg.generate.decoder``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from mtnlg.generate.decoder import Engine, _choose, _failed, _guarded, _isolated
from mtnlg.generate.sampling import draw_uniforms
from mtnlg.generate.scheduler import BlockPool, Scheduler, Seq
from mtnlg.generate.sequence import Request, Row, TokenEvent
from mtnlg.model.paged_cache import PagedKVCache

_SETTINGS = ("temperature", "top_k", "top_p", "repetition_penalty")


class _Live:
    """A row and its per-sequence tensors: sampling settings, and the tokens seen (the penalty)."""

    def __init__(self, row: Row, vocab_size: int, device: torch.device) -> None:
        self.row = row
        self.settings = {name: torch.tensor(getattr(row.params, name), device=device) for name in _SETTINGS}
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.seen[torch.tensor(row.request.prompt, device=device)] = True


class PagedDecoder:
    """Sequences in progress over an engine's ``BlockPool``: ``add`` them (any time), ``step`` until empty."""

    def __init__(self, engine: Engine, pool: BlockPool, prefill_chunk: int | None = None) -> None:
        self.engine, self.pool = engine, pool
        self.scheduler: Scheduler[_Live] = Scheduler(pool, engine.max_batch_size, prefill_chunk)
        self.cache = PagedKVCache(pool.storage)
        self.added = 0
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0}

    def __len__(self) -> int:
        """Sequences not finished (waiting for blocks, prefilling or decoding)."""
        return len(self.scheduler)

    def can_add(self, requests: Sequence[Request]) -> bool:
        """Whether ``requests`` can join: rows under the cap, and free blocks for their prompts."""
        fits = all(len(r.prompt) + r.params.max_new_tokens <= self.engine.seq_len for r in requests)
        return bool(requests) and fits and self.scheduler.can_add([r.prompt for r in requests])

    def add(self, requests: Sequence[Request]) -> tuple[list[int], list[TokenEvent]]:
        """Queue ``requests`` (which must ``can_add``); returns their event indices and the events they
        end with at once (no token budget, or settings that cannot be sampled with)."""
        if not self.can_add(requests):
            raise ValueError("these requests cannot join now; check can_add first")
        engine = self.engine
        indices = list(range(self.added, self.added + len(requests)))
        self.added += len(requests)
        events = []
        for index, request in zip(indices, requests, strict=True):
            row = Row(index, request, engine.tokenizer, engine.seed_for(request.params))
            if request.params.max_new_tokens == 0:
                events.append(TokenEvent(index, None, "", finish_reason="length"))
                continue
            try:
                live = _Live(row, engine.vocab_size, engine.device)
            except Exception as exc:
                events.append(_failed(row, exc))
                continue
            self.scheduler.add(live, request.prompt)
        return indices, events

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit, prefill (a chunk of) the admitted prompts, then decode one token for every prefilled row."""
        sched = self.scheduler
        if not len(sched):
            return []
        t0 = time.perf_counter()
        sched.admit()
        events, done, prefilled = [], set(), False
        budget = sched.prefill_chunk or self.engine.seq_len * max(len(sched.running), 1)
        while budget > 0:  # rounds: a round's prefills may let sequences waiting on their blocks go next
            works = []
            while budget > 0 and (work := sched.next_prefill(budget, done)) is not None:
                works.append(work)
                budget -= work[1]
            if not works:
                break
            prefilled = True
            for group in _groups(works):
                by_row = {seq.item.row.index: (seq, n) for seq, n in group}
                _, failed = _isolated([seq.item.row for seq, _ in group], lambda rows, w=by_row: self._forward(
                    [w[r.index][0] for r in rows], [w[r.index][1] for r in rows]))
                for event in failed:
                    events.append(event)
                    sched.finish(by_row[event.index][0])
        t1 = time.perf_counter()
        ready, _ = sched.decodable()
        if not prefilled and not ready and sched.running:  # every block is held by prefills that cannot go on
            sched.preempt(max(sched.running, key=lambda s: s.order))
        if ready:
            events += self._decode(ready)
        self.stats["prefill_s"] += t1 - t0
        self.stats["decode_s"] += time.perf_counter() - t1
        return sorted(events, key=lambda e: e.index)

    def _forward(self, seqs: list[Seq[_Live]], ns: list[int]) -> torch.Tensor:
        """Run the model over the next ``ns[i]`` tokens of each of ``seqs`` (their blocks reserved);
        returns the logits of each one's last token, (B, V).

        The frame of S = width + T positions (T = max ns) right-aligns each row: left padding, its
        cached keys, padding for the new tokens it has fewer than T of (their keys masked, written to
        the scratch block), its new tokens."""
        device, pool, bs = self.engine.device, self.pool, self.pool.block_size
        starts = [s.table.cached for s in seqs]
        width, T = max(starts), max(ns)
        offsets = torch.arange(bs, device=device)
        read = torch.zeros(len(seqs), width + T, dtype=torch.long, device=device)  # padding reads slot 0
        keep = torch.zeros(len(seqs), width + T, dtype=torch.bool, device=device)
        fed = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
        positions = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
        for i, (seq, start, n) in enumerate(zip(seqs, starts, ns, strict=True)):
            slots = (torch.tensor(seq.table.blocks, dtype=torch.long, device=device).unsqueeze(1) * bs + offsets)
            slots = slots.flatten()[: start + n]
            read[i, width - start : width], read[i, width + T - n :] = slots[:start], slots[start:]
            keep[i, width - start : width], keep[i, width + T - n :] = True, True
            fed[i, T - n :] = torch.tensor(seq.tokens[start : start + n], device=device)
            positions[i, T - n :] = torch.arange(start, start + n, device=device)
        self.cache.plan(read[:, width:], read)  # the new tokens' slots end every row
        kwargs: dict = {"kv_cache": self.cache, "position_ids": positions}
        if not bool(keep.all()):
            kwargs["attention_mask"] = keep
        logits = self.engine.model(fed, **kwargs)
        for seq, n in zip(seqs, ns, strict=True):
            seq.table.commit(pool, seq.tokens, n)
        return logits[:, -1, : self.engine.vocab_size].float()

    def _decode(self, ready: list[Seq[_Live]]) -> list[TokenEvent]:
        """One decode forward over ``ready``; sample, and retire the rows that finished."""
        engine = self.engine
        try:
            logits = self._forward(ready, [1] * len(ready))
        except Exception as exc:  # not any one row's fault: every row ends with the error
            for seq in ready:
                self.scheduler.finish(seq)
            return [_failed(s.item.row, exc) for s in ready]
        rows = [s.item.row for s in ready]
        view = SimpleNamespace(
            rows=rows,
            settings={k: torch.stack([s.item.settings[k] for s in ready]) for k in _SETTINGS},
            seen=torch.stack([s.item.seen for s in ready]),
        )
        uniform = draw_uniforms([r.generator for r in rows])
        chosen, events = _isolated(rows, lambda some: _choose(view, some, logits, uniform))
        eod = engine.tokenizer.eod_id if engine.tokenizer is not None else None
        by_index = {s.item.row.index: s for s in ready}
        for row in rows:
            if row.index in (chosen or {}):
                token = chosen[row.index][0]
                events.append(_guarded(row, lambda r=row: r.step(*chosen[r.index], eod)))
                by_index[row.index].tokens.append(token)
                by_index[row.index].item.seen[token] = True
        for event in events:
            if event.finish_reason is not None:
                self.scheduler.finish(by_index[event.index])
        self.stats["decode_tokens"] += len(events)
        return events

    def cancel(self, indices: set[int]) -> list[TokenEvent]:
        """Retire the sequences with these event indices (e.g. their client left)."""
        gone = [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.item.row.index in indices]
        for seq in gone:
            self.scheduler.finish(seq)
        return [TokenEvent(s.item.row.index, None, "", finish_reason="cancelled") for s in gone]

    def live(self) -> list[int]:
        """Event indices of the sequences not finished."""
        return sorted(s.item.row.index for s in (*self.scheduler.running, *self.scheduler.waiting))

    def rollback(self, index: int, length: int) -> None:
        """Cut sequence ``index`` back to its first ``length`` tokens (prompt included): their keys
        stay cached, later ones are forgotten (e.g. rejected speculative tokens)."""
        seq = next(s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.item.row.index == index)
        del seq.tokens[length:]
        seq.table.truncate(self.pool, min(seq.table.cached, max(length - 1, 0)))


def _groups(works: list[tuple[Seq[_Live], int]]) -> list[list[tuple[Seq[_Live], int]]]:
    """Prefill works batched into forwards, similar lengths together: a group pads to its longest, and
    takes a work while the padding stays under half of what it computes."""
    groups: list[list[tuple[Seq[_Live], int]]] = []
    for work in sorted(works, key=lambda w: w[1]):
        if groups and (len(groups[-1]) + 1) * work[1] <= 2 * (sum(n for _, n in groups[-1]) + work[1]):
            groups[-1].append(work)
        else:
            groups.append([work])
    return groups
