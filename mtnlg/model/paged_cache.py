"""Block (paged) key/value storage, and the cache view one forward pass writes and reads through.

``BlockStorage`` holds, per layer, one pool of ``num_blocks * block_size`` position slots; a
sequence's keys and values live in the blocks of its block table (``mtnlg.generate.scheduler``
hands them out), so memory is spent per position actually cached, not per row at the full
context length. Slot ``b * block_size + i`` is position ``i`` of block ``b``; block 0 is never
handed out: it is the scratch block that padding reads.

``PagedKVCache`` speaks the model's cache protocol (``update(layer, k, v)``, ``advance``,
``length``), so the GPT runs unchanged: before each forward the caller ``plan``s the slots each
row writes this step's keys to and reads all its keys from, in a left-padded frame of
``length`` + T positions (the padding masked by the caller, as for the contiguous cache).
``update`` scatters the new keys into their slots and returns the gathered (B, G, S, D) views,
which SDPA attends over. The pools are allocated on the first write, their head count and dtype
taken from the keys, so a tensor-parallel rank stores only its own heads.

Decode steps do not gather: ``DecodeFrame`` keeps the decoding rows' keys in that padded layout
from one step to the next (``plan_decode``), so a step copies only its new keys, and rows are
gathered from their blocks only when they join the batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FRAME_HEADROOM = 64  # columns a decode frame is allocated beyond what it needs, so that it grows rarely
DEFAULT_FREE_FRACTION = 0.25  # of the free memory, the pool's default size
MAX_POOL_SEQUENCES = 4  # the default pool holds at most this many times max_batch_size full-length sequences


class BlockStorage:
    """Per-layer pools of key and value slots: (num_blocks * block_size, G, D) each."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, bytes_per_block: int = 0) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a block pool needs >= 2 blocks of >= 1 position, got {num_blocks} of {block_size}")
        self.num_blocks, self.block_size, self.bytes_per_block = num_blocks, block_size, bytes_per_block
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def pools(self, layer: int, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s key and value pools, allocated like ``k`` (B, G, T, D) on first use."""
        if self.keys[layer] is None:
            G, D = k.shape[1], k.shape[3]
            for pools in (self.keys, self.values):  # untouched memory: pages are only spent as blocks are written
                pools[layer] = k.new_empty(self.num_blocks * self.block_size, G, D)
                pools[layer][: self.block_size] = 0  # the scratch block: masked, but 0 * its value must be 0
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None
        return keys, values

    def copy_block(self, src: int, dst: int, positions: int) -> None:
        """Copy the first ``positions`` slots of block ``src`` into block ``dst`` (copy on write)."""
        a, b = src * self.block_size, dst * self.block_size
        for pools in (self.keys, self.values):
            for pool in pools:
                if pool is not None:
                    pool[b : b + positions] = pool[a : a + positions]

    def allocated_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (*self.keys, *self.values) if p is not None)


class DecodeFrame:
    """The decoding rows' keys and values, left-padded into one (rows, G, columns, D) tensor per layer.

    Gathering every row's blocks into a padded view at each step copies the whole batch's cache per
    token (as much time as a small model's own arithmetic); the frame keeps the view instead: a
    step writes its new keys into column ``width`` (and into their blocks) and attends over the
    first ``rows`` rows and ``width + 1`` columns. Row ``r`` is right-aligned: its keys end at
    column ``width``, the ``pads[r]`` columns before them are zeros (masked, and 0 x a finite value
    is 0). Between steps the caller rearranges rows with ``plan`` (rows leave: the last ones move
    into their places; rows join: their blocks are gathered into new last rows); the tensor work of
    a plan is done layer by layer in ``step``, from the keys already in the pools. The cost: a second
    copy of the decoding rows' keys (rows x the longest one, plus ``FRAME_HEADROOM``) beside their blocks.
    """

    def __init__(self, storage: BlockStorage, max_rows: int) -> None:
        self.storage, self.max_rows = storage, max_rows  # rows allocated at once (the decode batch's cap)
        self.keys: list[torch.Tensor | None] = [None] * len(storage.keys)
        self.values: list[torch.Tensor | None] = [None] * len(storage.keys)
        self.rows, self.width = 0, 0  # rows in use (the first ones); columns of cached keys
        self.pads: list[int] = []  # per row, the padding columns before its keys
        self._plan: tuple = ((), 0, 0, None)

    def clear(self) -> None:
        """Forget every row (the tensors stay for the next rows)."""
        self.rows, self.width, self.pads = 0, 0, []
        self._plan = ((), 0, 0, None)

    def plan(self, moves: list[tuple[int, int]], trim: int, join: torch.Tensor | None, width: int) -> None:
        """Rearrange the rows before the next step: copy row ``src`` to row ``dst`` for each of
        ``moves`` (the rows left are the first ``rows - len(moves)`` ...), drop ``trim`` columns from the
        left, set the width to ``width`` and append rows read from the slots ``join`` (n, width) (slot 0,
        the scratch block, for their padding). The caller has set ``rows`` and ``pads`` to the result."""
        self._plan = (tuple(moves), trim, width, join)
        self.width = width

    def step(self, layer: int, pools: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Carry out the plan on layer ``layer``, write its new keys and values (rows, G, 1, D) at column
        ``width`` and return every row's (rows, G, width + 1, D)."""
        moves, trim, width, join = self._plan
        kept = self.rows - (0 if join is None else join.shape[0])
        out = []
        for frames, pool, x in zip((self.keys, self.values), pools, new, strict=True):
            frame = frames[layer]
            for src, dst in moves:
                frame[dst] = frame[src]
            if trim:
                frame = frame[:, :, trim:]
            if frame is None or frame.shape[0] < self.rows or frame.shape[2] < width + 1:
                grown = pool.new_empty(max(self.rows, self.max_rows), pool.shape[1],
                                       width + 1 + FRAME_HEADROOM, pool.shape[2])
                if frame is not None and kept:
                    grown[:kept, :, :width] = frame[:kept, :, :width]
                frame = grown
            if join is not None:
                n, G, D = join.shape[0], pool.shape[1], pool.shape[2]
                frame[kept : self.rows, :, :width] = pool.index_select(0, join.reshape(-1)).view(n, width, G, D
                                                                                                 ).transpose(1, 2)
            frame[: self.rows, :, width] = x[:, :, 0]
            frames[layer] = frame
            out.append(frame[: self.rows, :, : width + 1])
        return out[0], out[1]

    def advance(self) -> None:
        """The step's keys are in: one more column of every row."""
        self.width += 1
        self._plan = ((), 0, self.width, None)


class PagedKVCache:
    """The cache of one forward pass over a ``BlockStorage``: the model's ``KVCache`` protocol."""

    def __init__(self, storage: BlockStorage) -> None:
        self.storage = storage
        self.length = 0  # cached positions of the padded frame (the first new token's position in it)
        self._write: torch.Tensor | None = None  # (B * T,) slots of the new tokens
        self._read: torch.Tensor | None = None  # (B * S,) slots of every key, S = length + T
        self._frame: DecodeFrame | None = None  # a decode step's: every key is read from it

    def plan(self, write: torch.Tensor, read: torch.Tensor) -> None:
        """Set the slots of the next forward: ``write`` (B, T) for its new tokens, ``read`` (B, S)
        for all keys (the cached ones, then the new ones; left padding reads slot 0)."""
        B, T = write.shape
        if read.shape[0] != B or read.shape[1] < T:
            raise ValueError(f"read slots {tuple(read.shape)} do not cover write slots {tuple(write.shape)}")
        self.length = read.shape[1] - T
        self._write, self._read, self._shape = write.reshape(-1), read.reshape(-1), (B, read.shape[1])
        self._frame = None

    def plan_decode(self, write: torch.Tensor, frame: DecodeFrame) -> None:
        """Set the slots of a decode step over ``frame`` (planned): ``write`` (rows,), one new key per row."""
        self.length = frame.width
        self._write, self._read, self._shape, self._frame = write, None, (frame.rows, frame.width + 1), frame

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's ``k, v`` (B, G, T, D) in their slots and return every key and value of the
        frame, (B, G, S, D)."""
        if self._write is None or (self._read is None and self._frame is None):
            raise ValueError("PagedKVCache.plan must be called before each forward")
        B, G, T, D = k.shape
        keys, values = self.storage.pools(layer, k)
        if self._write.numel() != B * T:
            raise ValueError(f"planned {self._write.numel()} new positions, the forward brought {B * T}")
        keys.index_copy_(0, self._write, k.transpose(1, 2).reshape(B * T, G, D))
        values.index_copy_(0, self._write, v.transpose(1, 2).reshape(B * T, G, D))
        if self._frame is not None:
            return self._frame.step(layer, (keys, values), (k, v))
        assert self._read is not None
        S = self._shape[1]
        gathered_k = keys.index_select(0, self._read).view(B, S, G, D).transpose(1, 2)
        gathered_v = values.index_select(0, self._read).view(B, S, G, D).transpose(1, 2)
        return gathered_k, gathered_v

    def advance(self, n_tokens: int) -> None:
        """The model's call after its last layer; the block tables (the caller's) record what was written."""
        self.length += n_tokens
        self._write = self._read = self._frame = None


def block_bytes(model: nn.Module, block_size: int) -> int:
    """Bytes of one block: keys and values of ``block_size`` positions in every layer, with the local
    key/value heads read from the (possibly sharded or quantized) fused q/k/v projection's rows."""
    total = 0
    element = next(model.parameters()).element_size()
    for block in model.blocks.values():
        attn = block.attn
        kv_width = attn.qkv_proj.out_features // (attn.group + 2)  # G * D: rows are [R q heads; k; v] per group
        total += 2 * block_size * kv_width * element
    return total


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's free bytes, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 30


def block_storage(model: nn.Module, max_batch_size: int, kv_cache_bytes: int | None, block_size: int) -> BlockStorage:
    """A ``BlockStorage`` of ``kv_cache_bytes`` (default: ``DEFAULT_FREE_FRACTION`` of free memory, at
    most ``MAX_POOL_SEQUENCES`` x ``max_batch_size`` full-length sequences). It must hold one
    full-length sequence, so that any request can finish alone."""
    per_block = block_bytes(model, block_size)
    one_sequence = math.ceil(model.cfg.seq_len / block_size) + 1  # + the scratch block
    if kv_cache_bytes is None:
        device = next(model.parameters()).device
        cap = MAX_POOL_SEQUENCES * max_batch_size * (one_sequence - 1) + 1
        blocks = min(int(free_memory_bytes(device) * DEFAULT_FREE_FRACTION) // per_block, cap)
        blocks = max(blocks, one_sequence)
    else:
        blocks = kv_cache_bytes // per_block
        if blocks < one_sequence:
            need = one_sequence * per_block
            raise ValueError(f"--kv-cache-bytes {kv_cache_bytes} holds {blocks} blocks of {per_block} bytes; one "
                             f"{model.cfg.seq_len}-token sequence needs {one_sequence} ({need} bytes)")
    layers = max(b.layer for b in model.blocks.values()) + 1  # update() is told the global layer number
    return BlockStorage(layers, blocks, block_size, per_block)
