"""Megatron-compatible indexed datasets: token ids in a ``.bin`` file, their layout in an ``.idx`` file.

The format is Megatron-LM's ``MMIDIDX`` (version 1), so files move freely between the two projects.
All integers are little-endian::

    PREFIX.idx   b"MMIDIDX\\x00\\x00"       9-byte magic
                 <Q  version = 1
                 <B  dtype code of the tokens (DTYPE_CODES)
                 <Q  sequence count S
                 <Q  document-index length D + 1 (D documents)
                 int32[S]     sizes: tokens per sequence
                 int64[S]     pointers: byte offset of each sequence in PREFIX.bin
                 int64[D + 1] document index: document d is sequences [index[d], index[d + 1])
    PREFIX.bin   every sequence's tokens back to back, in the dtype

mtnlg writes one sequence per document (Megatron does the same unless ``--split-sentences``);
the reader handles several. Reading is a zero-copy view into a memory map, so a dataset larger
than RAM costs only the pages actually touched.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from mtnlg.util.fs import commit_file, temp_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
# Megatron's DType enum: the code stored in the header for each token dtype.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


class DataError(ValueError):
    """Input data is malformed or inconsistent; the message names the file (and line or field)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32: Megatron's rule (``vocab_size < 65500``), kept so that
    mtnlg and Megatron produce byte-identical files for the same tokens."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Streams documents into ``PREFIX.bin`` and writes ``PREFIX.idx`` at :meth:`finalize`.

    Both files are written under temporary names and renamed only when complete, so a crash or an
    error never leaves a truncated dataset behind. Sizes are kept in compact arrays (4 + 8 bytes per
    sequence), so memory grows with the number of documents, not with the number of tokens.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type[np.number]) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF or self.dtype.kind not in "iu":
            raise ValueError(f"token dtype {self.dtype} is not an integer dtype with an MMIDIDX code")
        self.bin_path, self.idx_path = bin_path(prefix), idx_path(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp, self._idx_tmp = temp_path(self.bin_path, unique=True), temp_path(self.idx_path, unique=True)
        self._bin = open(self._bin_tmp, "wb")  # closed by finalize() or abort()
        self._sizes = array("i")
        self._doc_index = array("q", [0])
        self.tokens = 0

    def add_document(self, tokens: ArrayLike, sequence_lengths: ArrayLike | None = None) -> None:
        """Append one document; ``sequence_lengths`` splits it into several sequences (sentences)."""
        arr = np.asarray(tokens)
        lengths = [arr.size] if sequence_lengths is None else [int(n) for n in sequence_lengths]
        if sum(lengths) != arr.size:
            raise ValueError(f"sequence lengths sum to {sum(lengths)} but the document has {arr.size} tokens")
        self._write_tokens(arr)
        self._sizes.extend(lengths)
        self._doc_index.append(len(self._sizes))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents given as one concatenated token array and their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._write_tokens(tokens)
        start = len(self._sizes)
        self._sizes.extend(lengths.astype(np.int32).tolist())
        self._doc_index.extend(range(start + 1, start + 1 + lengths.size))

    def _write_tokens(self, arr: np.ndarray) -> None:
        if arr.size and (arr.min() < np.iinfo(self.dtype).min or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids {arr.min()}..{arr.max()} do not fit the dataset's dtype {self.dtype}")
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.tokens += arr.size

    @property
    def num_documents(self) -> int:
        return len(self._doc_index) - 1

    def finalize(self) -> tuple[Path, Path]:
        """Write the index, sync both files and move them into place; returns (bin, idx) paths."""
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            sizes = np.frombuffer(self._sizes, dtype=np.int32) if self._sizes else np.zeros(0, np.int32)
            pointers = np.zeros(sizes.size, dtype=np.int64)
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= self.dtype.itemsize
            with open(self._idx_tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", _CODE_OF[self.dtype]))
                f.write(struct.pack("<Q", sizes.size) + struct.pack("<Q", len(self._doc_index)))
                f.write(sizes.tobytes() + pointers.tobytes() + np.frombuffer(self._doc_index, np.int64).tobytes())
                f.flush()
                os.fsync(f.fileno())
            commit_file(self._bin_tmp, self.bin_path)
            commit_file(self._idx_tmp, self.idx_path)
        except BaseException:
            self.abort()
            raise
        return self.bin_path, self.idx_path

    def abort(self) -> None:
        """Drop the partial output (nothing at the final names is touched)."""
        self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            p.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


def _read_header(path: Path, raw: bytes) -> tuple[np.dtype, int, int]:
    """Validate the fixed 34-byte header; returns (dtype, sequence count, document-index length)."""
    if len(raw) < HEADER_SIZE or raw[: len(MAGIC)] != MAGIC:
        raise DataError(f"{path}: not a Megatron MMIDIDX index (the file must start with {MAGIC!r})")
    (version,) = struct.unpack_from("<Q", raw, 9)
    if version != VERSION:
        raise DataError(f"{path}: index version {version} is not supported (only {VERSION})")
    code = raw[17]
    if code not in DTYPE_CODES:
        raise DataError(f"{path}: unknown dtype code {code} in the header (known: {sorted(DTYPE_CODES)})")
    count, doc_count = struct.unpack_from("<QQ", raw, 18)
    return np.dtype(DTYPE_CODES[code]), count, doc_count


def _memmap(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"indexed dataset file not found: {path}")
    if path.stat().st_size == 0:  # mmap refuses empty files; an empty dataset is still valid
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class IndexedDataset:
    """Memory-mapped reader of ``PREFIX.bin``/``PREFIX.idx``; ``ds[i]`` is sequence ``i`` as a view."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        self.idx_path, self.bin_path = idx_path(prefix), bin_path(prefix)
        self._idx = _memmap(self.idx_path)
        self.dtype, count, doc_count = _read_header(self.idx_path, bytes(self._idx[:HEADER_SIZE]))
        # Megatron's multimodal variant appends one int8 mode per sequence; the layout before it is the same.
        expected = HEADER_SIZE + count * 12 + doc_count * 8
        if self._idx.size not in (expected, expected + count):
            raise DataError(
                f"{self.idx_path}: {self._idx.size} bytes, but its header announces {count} sequences and "
                f"{doc_count} document-index entries ({expected} bytes); the file is truncated or corrupt"
            )
        self.sizes = np.frombuffer(self._idx, np.int32, count, HEADER_SIZE)
        self.pointers = np.frombuffer(self._idx, np.int64, count, HEADER_SIZE + count * 4)
        self.document_index = np.frombuffer(self._idx, np.int64, doc_count, HEADER_SIZE + count * 12)
        self._bin = _memmap(self.bin_path)
        self.vocab_size: int | None = None  # when set (build_datasets), every token read must be below it
        self._check_consistency()

    def _check_consistency(self) -> None:
        """The index must cover the .bin exactly: sequences back to back from byte 0 to its end. An
        index of a smaller (or larger) dataset beside this .bin would cut documents in wrong places."""
        di = self.document_index
        if di.size == 0 or di[0] != 0 or di[-1] != self.sizes.size or np.any(np.diff(di) < 0):
            raise DataError(f"{self.idx_path}: the document index must rise from 0 to the sequence count")
        lengths = self.sizes.astype(np.int64) * self.dtype.itemsize
        end = int(lengths.sum())
        if end != self._bin.size:
            why = "is truncated" if end > self._bin.size else "has more tokens than the index covers"
            raise DataError(f"{self.bin_path}: {self._bin.size} bytes, but {self.idx_path} covers {end}: the .bin "
                            f"{why}, or the two files belong to different datasets")
        if np.any(self.sizes < 0) or not np.array_equal(self.pointers, np.cumsum(lengths) - lengths):
            raise DataError(f"{self.idx_path}: its sequence pointers do not follow its sizes (not back to back "
                            f"from byte 0): the index is corrupt")

    def __len__(self) -> int:
        """Number of sequences (equal to the number of documents for files mtnlg writes)."""
        return int(self.sizes.size)

    @property
    def num_documents(self) -> int:
        return int(self.document_index.size - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i``: a read-only view, nothing is copied."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {i} of {size} tokens")
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        tokens = np.frombuffer(self._bin, self.dtype, length, start)
        if self.vocab_size is not None and tokens.size and int(tokens.max()) >= self.vocab_size:
            raise DataError(f"{self.bin_path}: sequence {i} has token id {int(tokens.max())}, not below the model's "
                            f"vocabulary size {self.vocab_size} (model.vocab_size): the data was tokenized with "
                            "another tokenizer")
        return tokens

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences in {self.prefix}")
        return self.get(i % len(self))

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its sequences are contiguous in the .bin file)."""
        first, last = int(self.document_index[d]), int(self.document_index[d + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        count = int(self.sizes[first:last].sum(dtype=np.int64))
        return np.frombuffer(self._bin, self.dtype, count, int(self.pointers[first]))
