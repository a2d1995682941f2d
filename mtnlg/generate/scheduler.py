"""The scheduling side of the block KV cache: which blocks each sequence holds, and who runs next.

``BlockPool`` hands out the blocks of a ``BlockStorage`` and counts references to them. With
prefix caching each full block is hashed by (its parent block's hash, its tokens), so two
sequences that start with the same tokens (a chat system prompt, a few-shot header) share those
blocks read-only; a block nobody references keeps its keys and its hash, on an LRU list, until
a new block is needed and it is the oldest. ``SeqBlocks`` is one sequence's block table.

``Scheduler`` holds the sequences of a decoder: waiting ones are admitted while free blocks
cover their prompts (the row count only caps the decode batch), then prefilled (in chunks of at
most ``prefill_chunk`` tokens per step, shortest remaining prompt first, so one long prompt does
not stall the others' decoding; a prompt that got no prefill tokens in ``max_prefill_wait`` steps
goes first, the oldest such first, so a stream of short prompts cannot starve a long one) and
decoded. Cached blocks are looked up just before a sequence's
prefill, and a sequence whose next block an earlier one is prefilling waits for it: sixteen
clients arriving together with one system prompt prefill it once. When a decode step finds no free block the most
recently admitted sequence is preempted: its blocks are released (full ones stay cached) and it
waits at the front of the queue to be recomputed from its tokens, so an exhausted pool delays
sequences but never fails them.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mtnlg.model.paged_cache import BlockStorage

T = TypeVar("T")


class BlockPool:
    """Free blocks, reference counts and (with ``prefix_cache``) the hashes of full blocks."""

    def __init__(self, storage: BlockStorage, prefix_cache: bool = True) -> None:
        self.storage, self.prefix_cache = storage, prefix_cache
        self.block_size = storage.block_size
        self.free: deque[int] = deque(range(1, storage.num_blocks))  # block 0: padding's scratch block
        self.refs = [0] * storage.num_blocks
        self.hash_of: dict[int, int] = {}  # block -> its hash, for full blocks in the cache
        self.by_hash: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent hash, tokens) -> block
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self.stats = {"hit_tokens": 0, "queried_tokens": 0, "preemptions": 0, "peak_in_use": 0}

    @property
    def capacity(self) -> int:
        return self.storage.num_blocks - 1

    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return len(self.free) + len(self.lru)

    def in_use(self) -> int:
        return self.capacity - self.available()

    def allocate(self) -> int | None:
        """A block for one holder, or None when every block is held."""
        if self.free:
            block = self.free.popleft()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            self._forget(block)
        else:
            return None
        self.refs[block] = 1
        self.stats["peak_in_use"] = max(self.stats["peak_in_use"], self.in_use())
        return block

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.key_of:
                self.lru[block] = None
            else:
                self.free.append(block)

    def lookup(self, parent: int, tokens: tuple[int, ...]) -> int | None:
        """The cached block holding ``tokens`` after the blocks hashed ``parent``, now also held by the caller."""
        block = self.by_hash.get((parent, tokens))
        if block is not None:
            if self.refs[block] == 0:
                del self.lru[block]
            self.refs[block] += 1
        return block

    def peek(self, parent: int, tokens: tuple[int, ...]) -> int | None:
        return self.by_hash.get((parent, tokens))

    def register(self, block: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Enter the full ``block`` in the cache; returns its hash (the next block's parent)."""
        key = (parent, tokens)
        if self.prefix_cache and key not in self.by_hash and block not in self.key_of:
            self.by_hash[key], self.key_of[block] = block, key
        return hash(key)

    def unregister(self, block: int) -> None:
        """Take ``block`` out of the cache (it is about to be written)."""
        if block in self.key_of:
            self._forget(block)

    def _forget(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None and self.by_hash.get(key) == block:
            del self.by_hash[key]


ROOT = 0  # the parent hash of a sequence's first block
MAX_PREFILL_WAIT = 16  # steps a prompt may get no prefill tokens before it goes first


@dataclass
class SeqBlocks:
    """One sequence's block table: keys and values of positions [0, cached) live in ``blocks``."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chained hash of each full block registered
    cached: int = 0
    epoch: int = 0  # counts the times positions were forgotten: a copy of the keys (the decode frame) is stale

    def match(self, pool: BlockPool, tokens: list[int], limit: int) -> int:
        """Take the cached blocks that continue this table's full blocks along ``tokens`` (covering at
        most ``limit`` positions); returns the positions they add. Nothing is taken while the table
        holds a block not yet full."""
        bs, before = pool.block_size, self.cached
        if not pool.prefix_cache or self.cached != len(self.blocks) * bs:
            return 0
        while (len(self.blocks) + 1) * bs <= limit:
            chunk = tuple(tokens[len(self.blocks) * bs : (len(self.blocks) + 1) * bs])
            parent = self.hashes[-1] if self.hashes else ROOT
            block = pool.lookup(parent, chunk)
            if block is None:
                break
            self.blocks.append(block)
            self.hashes.append(hash((parent, chunk)))
        self.cached = len(self.blocks) * bs
        return self.cached - before

    def reserve(self, pool: BlockPool, end: int) -> bool:
        """Hold blocks for positions [0, end); False (holding what it got) when the pool runs out."""
        while len(self.blocks) * pool.block_size < end:
            block = pool.allocate()
            if block is None:
                return False
            self.blocks.append(block)
        return True

    def commit(self, pool: BlockPool, tokens: list[int], n: int) -> None:
        """Record ``n`` more positions written (``tokens`` holds at least ``cached + n``) and hash
        the blocks that became full."""
        self.cached += n
        bs = pool.block_size
        while len(self.hashes) < self.cached // bs:
            i = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else ROOT
            self.hashes.append(pool.register(self.blocks[i], parent, tuple(tokens[i * bs : (i + 1) * bs])))

    def truncate(self, pool: BlockPool, length: int) -> None:
        """Forget positions >= ``length`` (rejected speculative tokens, a rewound sequence). A kept block
        that will be written again is made this sequence's own: out of the cache, or copied if shared."""
        bs = pool.block_size
        if length >= self.cached:
            return
        self.epoch += 1
        keep = math.ceil(length / bs)
        for block in self.blocks[keep:]:
            pool.release(block)
        del self.blocks[keep:]
        del self.hashes[length // bs :]
        if length % bs:
            last = self.blocks[-1]
            if pool.refs[last] > 1:
                fresh = pool.allocate()
                if fresh is None:
                    raise RuntimeError("no free block to copy a shared block into")
                pool.storage.copy_block(last, fresh, length % bs)
                pool.release(last)
                self.blocks[-1] = fresh
            else:
                pool.unregister(last)
        self.cached = length

    def release(self, pool: BlockPool) -> None:
        """Give every block back, the last first: the LRU list then evicts a prefix's tail before its head."""
        for block in reversed(self.blocks):
            pool.release(block)
        self.blocks, self.hashes, self.cached = [], [], 0
        self.epoch += 1


@dataclass
class Seq(Generic[T]):
    """A sequence the scheduler runs: its tokens so far (prompt, then generated) and its blocks."""

    item: T  # the caller's (the decoder's row)
    tokens: list[int]
    order: int  # admission order: the latest admitted is preempted first
    table: SeqBlocks = field(default_factory=SeqBlocks)
    starved: int = 0  # steps in which its prompt was not fully prefilled and got no prefill tokens

    @property
    def to_prefill(self) -> int:
        """Positions still to prefill before it decodes (its last token is the decode step's input)."""
        return len(self.tokens) - 1 - self.table.cached


class Scheduler(Generic[T]):
    """Waiting and running sequences over one ``BlockPool``."""

    def __init__(self, pool: BlockPool, max_rows: int, prefill_chunk: int | None = None,
                 max_prefill_wait: int = MAX_PREFILL_WAIT) -> None:
        self.pool, self.max_rows, self.prefill_chunk = pool, max_rows, prefill_chunk
        self.max_prefill_wait = max_prefill_wait
        self.waiting: deque[Seq[T]] = deque()
        self.running: list[Seq[T]] = []
        self._order = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def blocks_for(self, tokens: list[int]) -> int:
        """Blocks a new sequence must be given to prefill ``tokens`` and decode once (cache hits excepted)."""
        bs, parent, hit = self.pool.block_size, ROOT, 0
        while self.pool.prefix_cache and (hit + 1) * bs <= len(tokens) - 1:
            chunk = tuple(tokens[hit * bs : (hit + 1) * bs])
            if self.pool.peek(parent, chunk) is None:
                break
            parent, hit = hash((parent, chunk)), hit + 1
        return math.ceil(len(tokens) / bs) - hit

    def can_add(self, token_lists: list[list[int]]) -> bool:
        """Whether sequences with these prompts may wait here: rows, and free blocks for every waiting prompt."""
        if len(self) + len(token_lists) > self.max_rows:
            return False
        need = sum(self.blocks_for(s.tokens) for s in self.waiting) + sum(self.blocks_for(t) for t in token_lists)
        return need <= self.pool.available()

    def add(self, item: T, tokens: list[int]) -> Seq[T]:
        seq = Seq(item, list(tokens), 0)
        self.waiting.append(seq)
        return seq

    def admit(self) -> None:
        """Move waiting sequences (in order) to running while free blocks cover their prompts."""
        while self.waiting:
            seq = self.waiting[0]
            if self.running and self.blocks_for(seq.tokens) > self.pool.available():
                return
            self.waiting.popleft()
            self.pool.stats["queried_tokens"] += len(seq.tokens)
            seq.order, self._order = self._order, self._order + 1
            self.running.append(seq)

    def next_prefill(self, budget: int, done: set[int]) -> tuple[Seq[T], int] | None:
        """The next prefill work of this step: (sequence, tokens to prefill now, at most ``budget``),
        its blocks held; None when there is none. Shortest remaining prompt first, but those starved
        for ``max_prefill_wait`` steps (``age``) before all, oldest first; cached blocks are taken
        just before (so one prefilled earlier in this step counts), and a sequence whose next block
        an earlier one is prefilling waits for it (a shared prompt is prefilled once). ``done``
        holds the ids of sequences given work this step already."""
        def rank(s: Seq[T]) -> tuple[bool, int, int]:
            aged = s.starved >= self.max_prefill_wait
            return not aged, s.order if aged else s.to_prefill, s.order

        waiting = sorted((s for s in self.running if s.to_prefill > 0 and id(s) not in done), key=rank)
        for seq in waiting:
            if self._follows(seq):
                continue
            done.add(id(seq))
            self.pool.stats["hit_tokens"] += seq.table.match(self.pool, seq.tokens, len(seq.tokens) - 1)
            n = min(seq.to_prefill, budget)
            if n <= 0:
                continue  # all of it was cached: it decodes now
            if not seq.table.reserve(self.pool, seq.table.cached + n):
                return None  # the pool is full: decoding frees or preempts blocks first
            return seq, n
        return None

    def age(self, done: set[int]) -> None:
        """End a step's prefills: each sequence still to prefill that ``done`` (given work) lacks starved once more."""
        for seq in self.running:
            if seq.to_prefill > 0 and id(seq) not in done:
                seq.starved += 1

    def _follows(self, seq: Seq[T]) -> bool:
        """Whether an earlier-admitted sequence is prefilling the very block ``seq`` would prefill next."""
        bs, table = self.pool.block_size, seq.table
        i = table.cached // bs
        if not self.pool.prefix_cache or table.cached != len(table.blocks) * bs or (i + 1) * bs > len(seq.tokens) - 1:
            return False
        parent, chunk = table.hashes[-1] if i else ROOT, seq.tokens[i * bs : (i + 1) * bs]
        return any(
            other.order < seq.order and other.to_prefill > 0 and i * bs <= other.table.cached < (i + 1) * bs
            and (i == 0 or other.table.hashes[i - 1] == parent) and other.tokens[i * bs : (i + 1) * bs] == chunk
            for other in self.running
        )

    def decodable(self) -> tuple[list[Seq[T]], list[Seq[T]]]:
        """The sequences to decode this step (each with a block for its next position), and those
        preempted to make room."""
        preempted: list[Seq[T]] = []
        ready = sorted((s for s in self.running if s.to_prefill == 0), key=lambda s: s.order)
        for seq in list(ready):
            if seq in preempted:
                continue
            while not seq.table.reserve(self.pool, seq.table.cached + 1):
                victim = max((s for s in self.running if s not in preempted), key=lambda s: s.order)
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
        return [s for s in ready if s not in preempted], preempted

    def preempt(self, seq: Seq[T]) -> None:
        """Release ``seq``'s blocks and put it first in line, to be recomputed from its tokens."""
        seq.table.release(self.pool)
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.pool.stats["preemptions"] += 1

    def finish(self, seq: Seq[T]) -> None:
        seq.table.release(self.pool)
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
