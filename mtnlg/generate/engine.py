"""The generation engine: prefill each prompt once, then decode one token per step from a KV cache.

A batch of prompts of different lengths is left-padded to the longest; an attention mask
hides the padding and ``position_ids`` give each row its own positions, so a row decodes
exactly as it would alone. Each step feeds only the newest token of every live row into the
model, whose keys and values are appended to a cache preallocated for the whole batch; rows
that finish (end of document, a stop string, their token budget, a cancelled client) leave
the batch, so the remaining ones stop paying for them, and new sequences can join a running
batch between steps (continuous batching): they are prefilled on their own and their keys and
values are placed in the last cache slots, the slots before them masked like left padding.

This is the one generation path of mtnlg: the CLI, the HTTP server and the benchmarks use it,
and a tensor-parallel model runs through it unchanged (it only calls ``model(...)`` and
``model.hidden_states(...)``, and samples deterministically from per-sequence seeds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from mtnlg.config import Config
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.sampling import apply_repetition_penalty, draw_uniforms, select_tokens
from mtnlg.generate.sequence import MAX_TOP_LOGPROBS, Completion, Request, Row, SamplingParams, TokenEvent
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache

__all__ = ["MAX_TOP_LOGPROBS", "Completion", "Engine", "Request", "SamplingParams", "TokenEvent"]

class Engine:
    """Batched, streaming text generation with a KV cache around a GPT (plain or quantized)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        max_batch_size: int = 8,
        seed: int = 0,
        config: Config | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = config  # the checkpoint's Config, when loaded from one (sampling defaults)
        self.tokenizer = tokenizer
        self.vocab_size = model.cfg.vocab_size  # padded ids >= this are never sampled
        self.seq_len = model.cfg.seq_len
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self._seeds = torch.Generator().manual_seed(seed)  # seeds for requests that bring none
        self.stats: dict[str, float] = {}  # timings of the last batch: prefill_s, decode_s, decode_tokens

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        quantize: str | None = None,
        device: str = "cpu",
        max_batch_size: int = 8,
        **kwargs: object,
    ) -> Engine:
        """Load a checkpoint (fp32, or int8 saved by ``mtnlg quantize``), optionally quantizing it,
        in the weight layout fastest for ``max_batch_size`` sequences at a time."""
        from mtnlg.quantize import load_for_inference

        model, cfg, tokenizer = load_for_inference(path, quantize, device, max_batch_size)
        return cls(model, tokenizer, max_batch_size, config=cfg, **kwargs)  # type: ignore[arg-type]

    # -- requests ------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt given as text or ids; an empty prompt starts a new document."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:3]}")
        if not ids:
            if self.tokenizer is None:
                raise ValueError("empty prompt and no tokenizer to supply <|endoftext|>")
            ids = [self.tokenizer.eod_id]
        return ids

    def request(self, prompt: str | Sequence[int], params: SamplingParams, truncate: bool = False) -> Request:
        """Validate one prompt + settings; a prompt that leaves no room for ``max_new_tokens`` is an
        error, or with ``truncate`` loses its oldest tokens."""
        params.validate()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        ids = self.encode(prompt)
        room = self.seq_len - params.max_new_tokens
        if len(ids) > room:
            if not truncate or room < 1:
                raise ValueError(
                    f"prompt of {len(ids)} tokens + {params.max_new_tokens} tokens to generate exceeds the "
                    f"context length {self.seq_len}"
                )
            ids = ids[-room:]
        return Request(ids, params)

    def fits(self, requests: Sequence[Request]) -> bool:
        """Whether these requests can share one batch: the padded prompt plus the longest
        generation must fit the context, and the batch the size limit."""
        longest = max(len(r.prompt) for r in requests)
        budget = max(r.params.max_new_tokens for r in requests)
        return len(requests) <= self.max_batch_size and longest + budget <= self.seq_len

    def plan_batches(self, requests: Sequence[Request]) -> list[list[int]]:
        """Group request indices into batches that ``fits`` (prompts of similar length together)."""
        batches: list[list[int]] = []
        for i in sorted(range(len(requests)), key=lambda j: len(requests[j].prompt)):
            if batches and self.fits([requests[j] for j in batches[-1]] + [requests[i]]):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    # -- high-level calls ----------------------------------------------------------------------

    def generate(
        self,
        prompts: Iterable[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        truncate: bool = False,
    ) -> list[Completion]:
        """Complete every prompt (batched as ``fits`` allows); results in prompt order."""
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        requests = [self.request(p, sp, truncate) for p, sp in zip(prompts, params, strict=True)]
        out = [Completion(r.prompt) for r in requests]
        for batch in self.plan_batches(requests):
            for event in self.run([requests[i] for i in batch]):
                out[batch[event.index]].add(event)
        return out

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Events for one prompt as its tokens are produced."""
        yield from self.run([self.request(prompt, params or SamplingParams())])

    # -- the decode loop -----------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, requests: Sequence[Request], admit: Admit | None = None) -> Iterator[TokenEvent]:
        """Generate for one batch of validated requests, yielding each row's events as produced.

        Continuous batching: between decode steps ``admit`` (if given) is called with a predicate
        that says whether a request can join the running batch (True means it is taken); the
        requests it returns join, and their events carry indices ``len(requests)``, ``+1``, ...
        in the order returned.
        """
        if not requests or not self.fits(requests):
            raise ValueError("requests do not fit one batch; group them with plan_batches")
        decoder = _Decoder(self)
        yield from decoder.add(requests)
        yield from decoder.loop(admit)

    def _seed(self, params: SamplingParams) -> int:
        if params.seed is not None:
            return params.seed
        return int(torch.randint(0, 2**62, (), generator=self._seeds))


Admit = Callable[[Callable[[Request], bool]], list[Request]]


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


class _Decoder:
    """Runs one batch: admits rows, decodes a token per live row per step, retires finished rows."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batch: _Batch | None = None
        self.n_rows = 0  # rows ever added: the next row's event index
        self.engine.stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0}

    def add(self, requests: Sequence[Request]) -> Iterator[TokenEvent]:
        """Prefill ``requests`` and join them to the batch (rows with no token budget finish at once)."""
        t0 = time.perf_counter()
        engine = self.engine
        rows = [Row(self.n_rows + i, r, engine.tokenizer, engine._seed(r.params)) for i, r in enumerate(requests)]
        self.n_rows += len(rows)
        for row in rows:
            if row.params.max_new_tokens == 0:
                yield TokenEvent(row.index, None, "", finish_reason="length")
        rows = [r for r in rows if r.params.max_new_tokens > 0]
        if rows:
            part = _Batch(engine, rows)
            if self.batch is None or not self.batch.rows:
                self.batch = part
            else:
                self.batch.merge(part)
        engine.stats["prefill_s"] += time.perf_counter() - t0

    def loop(self, admit: Admit | None) -> Iterator[TokenEvent]:
        while self.batch is not None and self.batch.rows:
            t0 = time.perf_counter()
            events = self._step()
            self.engine.stats["decode_s"] += time.perf_counter() - t0
            self.engine.stats["decode_tokens"] += len(events)
            yield from events
            keep = [i for i, e in enumerate(events) if e.finish_reason is None]
            for i in [i for i in keep if self.batch.rows[i].cancelled()]:
                keep.remove(i)
                yield TokenEvent(self.batch.rows[i].index, None, "", finish_reason="cancelled")
            if len(keep) < len(self.batch.rows):
                self.batch.retain(keep)
            if admit is not None and self.batch.rows:
                yield from self.add(admit(self._joiner()))

    def _joiner(self) -> Callable[[Request], bool]:
        """Whether a request can join now: a free row, a prompt no longer than the cache, and room
        in the context for its budget. Each True takes a row."""
        assert self.batch is not None
        length, free = self.batch.cache.length, self.engine.max_batch_size - len(self.batch.rows)

        def can_join(request: Request) -> bool:
            nonlocal free
            ok = free > 0 and len(request.prompt) - 1 <= length
            ok = ok and length + request.params.max_new_tokens <= self.engine.seq_len
            free -= ok
            return ok

        return can_join

    def _step(self) -> list[TokenEvent]:
        """Feed each row's newest token, choose its next one."""
        b, engine = self.batch, self.engine
        assert b is not None
        logits = engine.model(b.fed, **b.model_kwargs(b.next_pos.unsqueeze(1)))[:, -1, : engine.vocab_size].float()
        tokens, logprobs, tops = self._choose(b, logits)
        eod = engine.tokenizer.eod_id if engine.tokenizer is not None else None
        b.fed = torch.tensor(tokens, device=b.fed.device).unsqueeze(1)
        b.next_pos = b.next_pos + 1
        return [r.step(*x, eod) for r, *x in zip(b.rows, tokens, logprobs, tops, strict=True)]

    @staticmethod
    def _choose(b: _Batch, logits: torch.Tensor) -> tuple[list[int], list, list]:
        """Sample every row's token, and its log-probs when the row asked for them."""
        s = b.settings
        if bool((s["repetition_penalty"] != 1).any()):
            logits = apply_repetition_penalty(logits, b.seen, s["repetition_penalty"])
        uniform = draw_uniforms([r.generator for r in b.rows])
        chosen = select_tokens(logits, s["temperature"], s["top_k"], s["top_p"], uniform)
        b.seen.scatter_(1, chosen.unsqueeze(1), True)
        tokens = chosen.tolist()
        wanted = [r.params.logprobs for r in b.rows]
        if all(k is None for k in wanted):
            return tokens, [None] * len(tokens), [None] * len(tokens)
        logp = torch.log_softmax(logits, dim=-1)  # the model's distribution (after any penalty)
        picked = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        top_v, top_i = logp.topk(max(k or 0 for k in wanted), dim=-1)
        tops = [
            None if k is None else dict(zip(top_i[i, :k].tolist(), top_v[i, :k].tolist(), strict=True))
            for i, k in enumerate(wanted)
        ]
        return tokens, [None if k is None else lp for k, lp in zip(wanted, picked, strict=True)], tops
