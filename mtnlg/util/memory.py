"""Allocator profiles: how a process asks glibc to hand freed memory back.

glibc serves a request of more than its mmap threshold (128 KiB) with mmap, but raises the
threshold (up to 32 MiB) whenever such a block is freed; from then on buffers of varied sizes
(activations of varied batches, a tokenizer's work on documents of varied lengths) come from the
heap, which fragments: a server replaying the same requests kept growing by hundreds of MB, and
``mtnlg evaluate`` of one 20 MB document reached 23.9 GB (0.65 GB with the threshold fixed).
A fixed threshold (what ``MALLOC_MMAP_THRESHOLD_`` sets) stops that. The commands whose
allocations vary in size call ``return_freed_memory`` as they start (``mtnlg.cli``); training,
whose steps allocate the same shapes every time, reuses its heap and is left as it is.
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD = 128 * 1024  # glibc's default starting threshold, kept fixed
_M_MMAP_THRESHOLD = -3  # malloc.h


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold, so large freed buffers go back to the OS; False where there is
    no glibc (the call is then a no-op)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
