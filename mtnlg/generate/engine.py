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

import functools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from mtnlg.config import Config
from mtnlg.config.sampling import MAX_TOP_LOGPROBS
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.decoder import Decoder
from mtnlg.generate.inspect import MAX_INSPECT_TOKENS, Inspection, inspect_prompt
from mtnlg.generate.load import load_for_inference
from mtnlg.generate.paged import PagedDecoder
from mtnlg.generate.scheduler import BlockPool
from mtnlg.generate.sequence import Completion, Request, SamplingParams, TokenEvent
from mtnlg.generate.speculative import Speculation
from mtnlg.model.gpt import GPT
from mtnlg.model.paged_cache import block_storage

__all__ = ["MAX_TOP_LOGPROBS", "Completion", "Decoder", "Engine", "Request", "SamplingParams", "TokenEvent"]

class Engine:
    """Batched, streaming text generation with a KV cache around a GPT (plain or quantized)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        max_batch_size: int = 8,
        seed: int = 0,
        config: Config | None = None,
        kv_cache: str = "contiguous",
        kv_cache_bytes: int | None = None,
        prefix_cache: bool = True,
        prefill_chunk: int | None = None,
        block_size: int = 16,
        speculation: Speculation | None = None,
    ) -> None:
        self.model = model.eval()
        self.speculation = speculation  # speculative decoding (None: off); every Decoder's steps use it
        self.config = config  # the checkpoint's Config, when loaded from one (sampling defaults)
        self.tokenizer = tokenizer
        self.vocab_size = model.cfg.vocab_size  # padded ids >= this are never sampled
        self.seq_len = model.cfg.seq_len
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self._seeds = torch.Generator().manual_seed(seed)  # seeds for requests that bring none
        if kv_cache not in ("contiguous", "paged"):
            raise ValueError(f"kv_cache must be 'contiguous' or 'paged', got {kv_cache!r}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be >= 1 token, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        # the block pool outlives each decoder, so its cached prefixes serve later requests too
        self.pool = None if kv_cache == "contiguous" else BlockPool(
            block_storage(model, max_batch_size, kv_cache_bytes, block_size), prefix_cache)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        quantize: str | None = None,
        device: str = "cpu",
        max_batch_size: int = 8,
        context: dict | None = None,
        **kwargs: object,
    ) -> Engine:
        """Load a checkpoint (fp32, or int8 saved by ``mtnlg quantize``), optionally quantizing it,
        in the weight layout fastest for ``max_batch_size`` sequences at a time; ``context``: its
        context length and RoPE scaling overridden (``load_for_inference``)."""
        model, cfg, tokenizer = load_for_inference(path, quantize, device, max_batch_size, context)
        return cls(model, tokenizer, max_batch_size, config=cfg, **kwargs)  # type: ignore[arg-type]

    # -- requests ------------------------------------------------------------------------------

    def encode(
        self, prompt: str | Sequence[int], limit: int | None = None, specials: Sequence[str] = ()
    ) -> list[int]:
        """Token ids of a prompt given as text (plain text, but for the special tokens in ``specials``:
        the chat template's markers) or ids; an empty prompt starts a new document.

        A text prompt that certainly has more than ``limit`` tokens (more UTF-8 bytes than ``limit`` of
        the longest tokens cover) is refused before it is tokenized."""
        if isinstance(prompt, str) and limit is not None and len(prompt) > limit * self._max_token_bytes:
            raise ValueError(f"prompt of {len(prompt)} characters exceeds the context length {self.seq_len} "
                             f"(room for at most {limit} prompt tokens)")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt, specials)
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
        params.validate(self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        room = self.seq_len - params.max_new_tokens
        ids = self.encode(prompt, None if truncate else max(room, 1))
        if len(ids) > room:
            if not truncate or room < 1:
                raise ValueError(
                    f"prompt of {len(ids)} tokens + {params.max_new_tokens} tokens to generate exceeds the "
                    f"context length {self.seq_len}"
                )
            ids = ids[-room:]
        return Request(ids, params)

    @functools.cached_property
    def _max_token_bytes(self) -> int:
        """An upper bound of the UTF-8 bytes one token stands for (1 without a tokenizer)."""
        return 1 if self.tokenizer is None else self.tokenizer.max_token_bytes()

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

    def inspect(self, prompt: str | Sequence[int], top_k: int = 5, attention_layer: int | None = None) -> Inspection:
        """The token inspector on one prompt (``mtnlg.generate.inspect``): each layer's top-``top_k``
        next-token predictions at every position, and ``attention_layer``'s per-head weights."""
        limit = min(MAX_INSPECT_TOKENS, self.seq_len)
        ids = self.encode(prompt, limit)
        if len(ids) > limit:
            raise ValueError(f"prompt of {len(ids)} tokens: the inspector takes at most {limit}")
        return inspect_prompt(self.model, ids, top_k, attention_layer, self.vocab_size)

    # -- the decode loop -----------------------------------------------------------------------

    def decoder(self) -> Decoder | PagedDecoder:
        """An empty batch to ``add`` requests to and ``step`` (the server's continuous batching): over
        the block pool when the engine has one, else over a contiguous cache of its own."""
        if self.pool is None:
            return Decoder(self)
        if self.speculation is not None:
            raise ValueError("speculative decoding runs on the contiguous KV cache (kv_cache='contiguous')")
        return PagedDecoder(self, self.pool, self.prefill_chunk)

    def kv_stats(self) -> dict[str, float] | None:
        """The block pool's figures (None without one): blocks in use and in all, prefix-cache hit
        rate (prompt tokens found cached / prompt tokens admitted), preemptions so far."""
        if self.pool is None:
            return None
        s = self.pool.stats
        return {"blocks_in_use": self.pool.in_use(), "blocks_total": self.pool.capacity,
                "peak_blocks_in_use": s["peak_in_use"], "preemptions": s["preemptions"],
                "prefix_hit_rate": s["hit_tokens"] / s["queried_tokens"] if s["queried_tokens"] else 0.0,
                "bytes_per_block": self.pool.storage.bytes_per_block}

    @torch.inference_mode()
    def run(self, requests: Sequence[Request]) -> Iterator[TokenEvent]:
        """Generate for one batch of validated requests (that ``fits``), yielding each row's events as
        produced; event ``index`` is the request's position in ``requests``."""
        if not requests or not self.fits(requests):
            raise ValueError("requests do not fit one batch; group them with plan_batches")
        decoder = self.decoder()
        yield from decoder.add(requests)[1]
        while len(decoder):
            yield from decoder.step()

    def seed_for(self, params: SamplingParams) -> int:
        """The sampling seed of a request: its own, or the next of the engine's seed stream."""
        if params.seed is not None:
            return params.seed
        return int(torch.randint(0, 2**62, (), generator=self._seeds))
