"""Per-layer key/value buffers for incremental decoding.

The buffers are allocated once, on the first write, at the full ``max_len``: decoding then
writes one slice per token and never reallocates. Their head count is taken from the keys
written, so a tensor-parallel rank caches only its own heads.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for positions ``[0, length)`` of a batch of sequences."""

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0  # positions already cached (the next token's position)
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's ``k, v`` (B, H, T, D) at ``length`` and return all cached ones."""
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions requested, capacity {self.max_len}")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_empty(B, H, self.max_len, D)
            self.values[layer] = v.new_empty(B, H, self.max_len, D)
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Mark ``n_tokens`` more positions as cached; the model calls this after its last layer."""
        self.length += n_tokens

    def truncate(self, length: int) -> None:
        """Forget the positions from ``length`` on (speculative decoding's rejected tokens): the next
        ``update`` overwrites them. The buffers stay."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def reset(self) -> None:
        """Forget the cached positions but keep the buffers for the next sequence."""
        self.length = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (e.g. drop finished sequences)."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]

    def append_rows(self, other: KVCache, rows: int, max_len: int) -> None:
        """Add ``other``'s ``rows`` sequences (no longer than ours) as new batch rows, right-aligned.

        Their last cached position lines up with ours, so their first ``self.length -
        other.length`` slots hold zeros: left padding the caller must mask. ``other`` may be
        empty (one-token prompts have nothing to prefill). The buffers are reallocated once, at
        ``max_len`` (never below the current capacity).
        """
        if other.length > self.length:
            raise ValueError(f"cannot append a cache of {other.length} positions to one of {self.length}")
        shift, end = self.length - other.length, self.length
        self.max_len = max(self.max_len, max_len)
        for buffers, extra in ((self.keys, other.keys), (self.values, other.values)):
            for layer, old in enumerate(buffers):
                assert old is not None, "append_rows needs a cache that has been written"
                B, H, _, D = old.shape
                merged = old.new_zeros(B + rows, H, self.max_len, D)
                merged[:B, :, :end] = old[:, :, :end]
                if extra[layer] is not None:
                    merged[B:, :, shift:end] = extra[layer][:, :, : other.length]
                buffers[layer] = merged
