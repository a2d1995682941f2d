"""``mtnlg merge``: several Megatron ``.bin``/``.idx`` datasets joined into one, in the order given.

What Megatron's ``tools/merge_datasets.py`` does: the merged dataset's sequences are the inputs'
sequences back to back and its documents the inputs' documents, so reading it equals reading the
inputs one after another. Tokens are copied in blocks straight from the memory maps (a dataset
larger than RAM costs only the block in flight), the index is written at the end, and both files
appear only when complete (mtnlg's indexed writer). All inputs must share one token dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtnlg.data.indexed import DataError, IndexedDataset, IndexedDatasetWriter

BLOCK_TOKENS = 1 << 26  # tokens copied per block (128 MiB of uint16)


@dataclass
class MergeReport:
    output_prefix: str
    inputs: int
    documents: int
    sequences: int
    tokens: int

    def summary(self) -> str:
        return (f"merged {self.inputs} datasets -> {self.output_prefix}.bin/.idx: {self.documents:,} documents, "
                f"{self.sequences:,} sequences, {self.tokens:,} tokens")


def merge_datasets(prefixes: Sequence[str | Path], output_prefix: str | Path) -> MergeReport:
    """Write ``output_prefix`` as the concatenation of the datasets ``prefixes``."""
    if not prefixes:
        raise DataError("merge needs at least one input dataset prefix")
    datasets = [IndexedDataset(p) for p in prefixes]
    dtypes = {str(ds.dtype) for ds in datasets}
    if len(dtypes) > 1:
        found = ", ".join(f"{ds.prefix}: {ds.dtype}" for ds in datasets)
        raise DataError(f"the datasets to merge hold different token dtypes ({found}); tokenize them alike")
    out = str(output_prefix)
    if any(Path(ds.prefix).resolve() == Path(out).resolve() for ds in datasets):
        raise DataError(f"the output prefix {out!r} is one of the inputs")
    with IndexedDatasetWriter(out, datasets[0].dtype) as writer:
        for ds in datasets:
            _copy(ds, writer)
        writer.finalize()
    return MergeReport(out, len(datasets), sum(ds.num_documents for ds in datasets),
                       sum(len(ds) for ds in datasets), sum(ds.num_tokens for ds in datasets))


def _copy(ds: IndexedDataset, writer: IndexedDatasetWriter) -> None:
    """Append every document of ``ds``: one-sequence documents in blocks of about ``BLOCK_TOKENS``
    tokens (sequences lie back to back in the .bin file), others one by one."""
    if not np.array_equal(ds.document_index, np.arange(len(ds) + 1)):
        for d in range(ds.num_documents):
            first, last = int(ds.document_index[d]), int(ds.document_index[d + 1])
            writer.add_document(ds.document(d), ds.sizes[first:last])
        return
    if len(ds) == 0:
        return
    tokens = np.memmap(ds.bin_path, dtype=ds.dtype, mode="r")
    ends = np.cumsum(ds.sizes, dtype=np.int64)
    cuts = np.unique(np.searchsorted(ends, np.arange(BLOCK_TOKENS, int(ends[-1]), BLOCK_TOKENS), side="right"))
    base = int(ds.pointers[0]) // ds.dtype.itemsize
    for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ds)]]), strict=True):
        if hi > lo:
            start = base + (int(ends[lo - 1]) if lo else 0)
            writer.add_documents(tokens[start:base + int(ends[hi - 1])], ds.sizes[lo:hi].astype(np.int64))
