"""The decoder over the block KV cache: the same ``add`` / ``step`` / ``cancel`` API as ``Decoder``.

``add`` only queues requests (admission is by free blocks, see ``mtnlg.generate.scheduler``);
each ``step`` admits what fits, runs this step's prefill work (one forward per sequence chunk,
continuing from the blocks it already has: cached prefix blocks are never recomputed), then one
decode forward over every sequence that has finished its prefill. Rows of different lengths
share a left-padded frame: each row's keys fill its last slots, the slots before them are zeros
and masked, and ``position_ids`` give each row its own positions, so a row decodes as it would
alone. A prefill forward gathers its rows' blocks into that frame; decode steps keep theirs from
step to step (``DecodeFrame``: a row's blocks are gathered once, when it joins the decoding rows,
and each step appends its new keys), so a decode step costs what it does with a contiguous cache.
Sampling, events and failure isolation are the contiguous decoder's (``mtnlg.generate.decoder``).
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
from mtnlg.model.paged_cache import DecodeFrame, PagedKVCache

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
        self.frame = DecodeFrame(pool.storage, engine.max_batch_size)
        self.frame_rows: list[tuple[Seq[_Live], int]] = []  # the frame's rows: (sequence, its table's epoch)
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
        sched.age(done)
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
        device, pool = self.engine.device, self.pool
        starts = [s.table.cached for s in seqs]
        width, T = max(starts), max(ns)
        read = torch.zeros(len(seqs), width + T, dtype=torch.long, device=device)  # padding reads slot 0
        keep = torch.zeros(len(seqs), width + T, dtype=torch.bool, device=device)
        fed = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
        positions = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
        for i, (seq, start, n) in enumerate(zip(seqs, starts, ns, strict=True)):
            slots = self._slots(seq, start + n)
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
            ready, logits = self._decode_forward(ready)
        except Exception as exc:  # not any one row's fault: every row ends with the error
            self.frame.clear()
            self.frame_rows = []
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

    def _decode_forward(self, ready: list[Seq[_Live]]) -> tuple[list[Seq[_Live]], torch.Tensor]:
        """One decode forward over ``ready`` through the decode frame; returns them in the frame's row
        order and the logits of their next tokens, (B, V)."""
        rows, frame, device, bs = self._arrange(ready), self.frame, self.engine.device, self.pool.block_size
        write = [s.table.blocks[s.table.cached // bs] * bs + s.table.cached % bs for s in rows]
        self.cache.plan_decode(torch.tensor(write, dtype=torch.long, device=device), frame)
        kwargs: dict = {"kv_cache": self.cache,
                        "position_ids": torch.tensor([[s.table.cached] for s in rows], device=device)}
        if any(frame.pads):
            pads = torch.tensor(frame.pads, device=device).unsqueeze(1)
            kwargs["attention_mask"] = torch.arange(frame.width + 1, device=device).unsqueeze(0) >= pads
        logits = self.engine.model(torch.tensor([[s.tokens[-1]] for s in rows], device=device), **kwargs)
        for seq in rows:
            seq.table.commit(self.pool, seq.tokens, 1)
        frame.advance()
        return rows, logits[:, -1, : self.engine.vocab_size].float()

    def _arrange(self, ready: list[Seq[_Live]]) -> list[Seq[_Live]]:
        """Plan the decode frame's rows for ``ready`` and return them in row order: rows whose keys are
        still those of their blocks stay (the last ones moving into the places of rows that left),
        the others are gathered from their blocks into new last rows, and padding columns every row
        has are dropped. A joining row longer than the frame starts it over."""
        frame, wanted = self.frame, {id(s) for s in ready}
        valid = [r for r, (s, epoch) in enumerate(self.frame_rows) if id(s) in wanted and s.table.epoch == epoch
                 and s.table.cached == frame.width - frame.pads[r]]
        held = {id(self.frame_rows[r][0]) for r in valid}
        joining = [s for s in ready if id(s) not in held]
        if any(s.table.cached > frame.width for s in joining):
            valid, joining = [], list(ready)
        if not valid:
            frame.clear()
            self.frame_rows = []
        K = len(valid)
        moves = list(zip([r for r in valid if r >= K], [r for r in range(K) if r not in set(valid)], strict=True))
        rows, pads = self.frame_rows[:], frame.pads[:]
        for src, dst in moves:
            rows[dst], pads[dst] = rows[src], pads[src]
        rows, pads = rows[:K], pads[:K]
        width = max([frame.width] + [s.table.cached for s in joining])
        trim = min(pads + [width - s.table.cached for s in joining]) if K else 0
        width -= trim
        join = None
        if joining:
            join = torch.zeros(len(joining), width, dtype=torch.long, device=self.engine.device)  # padding: slot 0
            for i, seq in enumerate(joining):
                if seq.table.cached:
                    join[i, width - seq.table.cached :] = self._slots(seq, seq.table.cached)
        frame.rows, frame.pads = K + len(joining), [p - trim for p in pads] + [width - s.table.cached for s in joining]
        frame.plan(moves, trim, join, width)
        self.frame_rows = rows + [(s, s.table.epoch) for s in joining]
        return [s for s, _ in self.frame_rows]

    def _slots(self, seq: Seq[_Live], end: int) -> torch.Tensor:
        """The pool slots of positions [0, end) of ``seq``, (end,)."""
        bs = self.pool.block_size
        blocks = torch.tensor(seq.table.blocks, dtype=torch.long, device=self.engine.device)
        return (blocks.unsqueeze(1) * bs + torch.arange(bs, device=blocks.device)).flatten()[:end]

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
