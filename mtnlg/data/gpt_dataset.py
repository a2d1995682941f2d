"""Fixed-length training samples cut across document boundaries, Megatron style, and their blending.

The documents of one split are laid end to end (each already ends with the end-of-document token)
in a shuffled order, epoch after epoch, forming one long token stream ``S``. Sample ``i`` is
``S[i * L : i * L + L + 1]`` for sequence length ``L``: the model reads ``s[:-1]`` and predicts
``s[1:]``, so consecutive samples share one token and no token is wasted. Three index arrays, built
once with numpy and cached as ``.npy`` files, make a sample a couple of memory-mapped reads:

* document index: the order of the documents in ``S`` (one permutation of the split per epoch);
* sample index: for every sample boundary ``i * L``, the (position in the document index, offset);
* shuffle index: the order samples are served in. The samples of the last epoch are shuffled apart
  from the others, so a prefix of the stream covers whole epochs before it repeats any document.

Splits are contiguous document ranges (``949,50,1``), so no document leaks between train, valid and
test. Blending serves dataset ``d`` with weight ``w_d`` such that after any ``n`` samples it has
served ``n * w_d`` of them up to about one sample (each sample goes to the dataset furthest behind
its share: Megatron's greedy rule, compiled in ``data.blend``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mtnlg.config import DataConfig
from mtnlg.data.blend import blending_indices
from mtnlg.data.indexed import DataError, IndexedDataset
from mtnlg.util.fs import atomic_file

INDEX_VERSION = 1
BLEND_VERSION = 3  # 3: the greedy order of version 1 again, compiled; 2 (due-time order) caches are rebuilt
SPLIT_NAMES = ("train", "valid", "test")


class Dataset(Protocol):
    """What the trainer needs: a length and fixed-length int64 samples."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


def parse_data_path(data_path: list[str]) -> list[tuple[float, str]]:
    """``['a']`` -> ``[(1.0, 'a')]``; ``['0.3', 'a', '0.7', 'b']`` -> weights normalised to sum 1."""
    if not data_path:
        raise DataError("data.data_path is empty: preprocess data with `mtnlg preprocess` and pass --data-path PREFIX")
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        raise DataError(f"data.data_path {data_path}: several datasets need 'WEIGHT PREFIX' pairs (0.3 a 0.7 b)")
    pairs = []
    for weight, prefix in zip(data_path[::2], data_path[1::2], strict=True):
        try:
            w = float(weight)
        except ValueError:
            raise DataError(f"data.data_path: {weight!r} (before {prefix!r}) should be a weight") from None
        if not w > 0 or not math.isfinite(w):
            raise DataError(f"data.data_path: the weight of {prefix!r} must be positive, got {weight}")
        pairs.append((w, prefix))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document ranges of train, valid and test for ``split`` like ``'949,50,1'`` (missing parts are 0)."""
    weights = [float(x) for x in split.split(",")] + [0.0, 0.0]
    weights = np.array(weights[:3]) / sum(weights)
    bounds = np.concatenate([[0], np.round(np.cumsum(weights) * num_documents)]).astype(np.int64)
    bounds[-1] = num_documents
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


# -- index construction (pure functions of their inputs) ---------------------------------------------


def num_epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Smallest number of epochs whose stream holds ``num_samples`` samples of ``seq_len + 1`` tokens."""
    return max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))


def build_document_index(sequences: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Each epoch an independent permutation of ``sequences``, concatenated."""
    return np.concatenate([rng.permutation(sequences) for _ in range(num_epochs)]).astype(np.int64)


def build_sample_index(sizes_in_order: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2): for each boundary ``i * seq_len`` of the stream, (document position, offset)."""
    ends = np.cumsum(sizes_in_order, dtype=np.int64)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    pos = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[pos] - sizes_in_order[pos])
    return np.stack([pos, offsets], axis=1)


def build_shuffle_index(num_samples: int, num_first: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of [0, num_first) followed by one of [num_first, num_samples)."""
    first = rng.permutation(num_first)
    return np.concatenate([first, num_first + rng.permutation(num_samples - num_first)]).astype(np.int64)


# -- datasets -----------------------------------------------------------------------------------------


class GPTDataset:
    """Samples of ``seq_len + 1`` tokens from the documents ``doc_range`` of one indexed dataset."""

    def __init__(
        self,
        indexed: IndexedDataset,
        doc_range: tuple[int, int],
        seq_len: int,
        num_samples: int,
        seed: int,
        cache_dir: str | Path | None = None,
        name: str = "train",
    ) -> None:
        self.indexed, self.seq_len = indexed, seq_len
        first, last = (int(indexed.document_index[d]) for d in doc_range)
        self.sequences = np.arange(first, last, dtype=np.int64)
        self.tokens_per_epoch = int(indexed.sizes[first:last].sum(dtype=np.int64))
        if self.tokens_per_epoch == 0:
            self.doc_idx = self.sample_idx = self.shuffle_idx = np.zeros(0, dtype=np.int64)
            return
        self.num_epochs = num_epochs_needed(self.tokens_per_epoch, seq_len, max(num_samples, 1))
        desc = {
            "version": INDEX_VERSION, "prefix": os.path.abspath(indexed.prefix), "split": name,
            "documents": list(doc_range), "seq_len": seq_len, "num_samples": num_samples, "seed": seed,
            "idx": _file_identity(indexed.idx_path), "bin": _file_identity(indexed.bin_path),
        }
        cache = _cache_dir(cache_dir, indexed)
        digest = hashlib.md5(json.dumps(desc, sort_keys=True).encode()).hexdigest()
        stem = f"{Path(indexed.prefix).name}.{name}.{digest}"
        arrays = _load_cached(cache, stem) or _save_cached(cache, stem, desc, self._build_indices(seed))
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays

    def _build_indices(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        doc_idx = build_document_index(self.sequences, self.num_epochs, rng)
        total = (self.num_epochs * self.tokens_per_epoch - 1) // self.seq_len
        sample_idx = build_sample_index(self.indexed.sizes[doc_idx].astype(np.int64), self.seq_len, total)
        first = ((self.num_epochs - 1) * self.tokens_per_epoch - 1) // self.seq_len if self.num_epochs > 1 else 0
        return doc_idx, sample_idx, build_shuffle_index(total, first, rng)

    def __len__(self) -> int:
        return int(self.shuffle_idx.size)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        j = int(self.shuffle_idx[i])
        (d0, o0), (d1, o1) = self.sample_idx[j], self.sample_idx[j + 1]
        if d0 == d1:
            return self.indexed.get(int(self.doc_idx[d0]), int(o0), int(o1 - o0 + 1)).astype(np.int64)
        parts = [self.indexed.get(int(self.doc_idx[d0]), int(o0))]
        parts += [self.indexed.get(int(self.doc_idx[d])) for d in range(d0 + 1, d1)]
        parts.append(self.indexed.get(int(self.doc_idx[d1]), 0, int(o1 + 1)))
        return np.concatenate(parts).astype(np.int64)


class BlendedDataset:
    """Mixes datasets: sample ``i`` is sample ``sample_index[i]`` of dataset ``dataset_index[i]``
    (the schedule ``blending_indices`` computes from the weights)."""

    def __init__(self, datasets: Sequence[Dataset], dataset_index: np.ndarray, sample_index: np.ndarray) -> None:
        self.datasets = list(datasets)
        self.dataset_index, self.sample_index = dataset_index, sample_index

    def __len__(self) -> int:
        return int(self.dataset_index.size)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]


class EmptyDataset:
    """A split with no documents."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> np.ndarray:
        raise IndexError("this split has no documents")


def _file_identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _cache_dir(cache_dir: str | Path | None, indexed: IndexedDataset) -> Path:
    """Where index caches go: ``data.cache_dir``, or beside the data."""
    return Path(cache_dir) if cache_dir else Path(indexed.prefix).parent


SAMPLE_INDICES = ("doc_idx", "sample_idx", "shuffle_idx")
BLEND_INDICES = ("dataset_index", "sample_index")


def _cache_files(cache: Path, stem: str, kinds: Sequence[str]) -> list[Path]:
    return [cache / f"{stem}.{kind}.npy" for kind in kinds]


def _load_cached(cache: Path, stem: str, kinds: Sequence[str] = SAMPLE_INDICES) -> tuple[np.ndarray, ...] | None:
    files = _cache_files(cache, stem, kinds)
    if not all(f.is_file() for f in files):
        return None
    return tuple(np.load(f, mmap_mode="r") for f in files)


def _save_cached(
    cache: Path, stem: str, desc: dict, arrays: tuple[np.ndarray, ...], kinds: Sequence[str] = SAMPLE_INDICES
) -> tuple[np.ndarray, ...]:
    """Write the index arrays (each atomically, so concurrent ranks never read half a file)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        files = _cache_files(cache, stem, kinds) + [cache / f"{stem}.json"]
        for path, arr in zip(files, arrays + (None,), strict=True):
            with atomic_file(path, "wb") as f:
                if arr is None:
                    f.write(json.dumps(desc, indent=1, sort_keys=True).encode())
                else:
                    np.save(f, arr)
    except OSError as exc:
        raise DataError(f"cannot write sample-index cache in {cache} ({exc}); set --data.cache_dir") from None
    return arrays


def _cached_blending_indices(weights: list[float], size: int, cache: Path, split: str) -> tuple[np.ndarray, ...]:
    """``blending_indices``, computed once and then read from ``cache`` (like the sample indices):
    even compiled, 10^9 samples take minutes."""
    desc = {"version": BLEND_VERSION, "weights": weights, "size": size}
    stem = f"blend.{split}.{hashlib.md5(json.dumps(desc, sort_keys=True).encode()).hexdigest()}"
    cached = _load_cached(cache, stem, BLEND_INDICES)
    return cached or _save_cached(cache, stem, desc, blending_indices(weights, size), BLEND_INDICES)


def epoch_samples(indexed: IndexedDataset, doc_range: tuple[int, int], seq_len: int) -> int:
    """Samples one epoch of ``doc_range`` yields."""
    first, last = (int(indexed.document_index[d]) for d in doc_range)
    tokens = int(indexed.sizes[first:last].sum(dtype=np.int64))
    return max(0, (tokens - 1) // seq_len)


def _build_split(
    blend: list[tuple[float, IndexedDataset]], ranges: list[list[tuple[int, int]]], split: int,
    seq_len: int, num_samples: int, data_cfg: DataConfig,
) -> Dataset:
    """One split: a GPTDataset for one source, a BlendedDataset over the sources that have documents."""
    name = SPLIT_NAMES[split]
    live = [(w, ds, r[split]) for (w, ds), r in zip(blend, ranges, strict=True) if r[split][1] > r[split][0]]
    if len(live) < len(blend) and live:
        empty = [ds.prefix for (_, ds), r in zip(blend, ranges, strict=True) if r[split][1] == r[split][0]]
        warnings.warn(f"{name} split: no documents in {empty}; blending the others", stacklevel=3)
    if not live:
        return EmptyDataset()
    if len(blend) == 1:
        ((_, ds, r),) = live
        return GPTDataset(ds, r, seq_len, num_samples, data_cfg.seed, data_cfg.cache_dir or None, name)
    total = sum(w for w, _, _ in live)
    weights = [w / total for w, _, _ in live]
    if num_samples <= 0:  # one pass: as many samples as fit before the scarcest source repeats
        passes = [int(epoch_samples(ds, r, seq_len) / w) for w, (_, ds, r) in zip(weights, live, strict=True)]
        num_samples = max(1, min(passes))
    cache = _cache_dir(data_cfg.cache_dir, live[0][1])
    dataset_index, sample_index = _cached_blending_indices(weights, num_samples, cache, name)
    counts = np.bincount(dataset_index, minlength=len(live))
    parts = [
        GPTDataset(ds, r, seq_len, int(c), data_cfg.seed, data_cfg.cache_dir or None, name)
        for (_, ds, r), c in zip(live, counts, strict=True)
    ]
    return BlendedDataset(parts, dataset_index, sample_index)


def build_datasets(
    data_cfg: DataConfig, seq_len: int, num_samples: tuple[int, int, int], vocab_size: int | None = None
) -> tuple[Dataset, Dataset, Dataset]:
    """Train, valid and test datasets of ``data_cfg.data_path`` (blended when several are given).

    Each split holds at least ``num_samples[s]`` samples of ``seq_len + 1`` tokens (as many epochs as
    needed); a split without documents is empty. With ``vocab_size``, a sample holding a token id
    not below it is an error naming the file (checked as each sample is read: a sample's max is
    cheap next to a step), never an ``IndexError`` (a device-side assert on GPU) in the model.
    """
    data_cfg.validate()
    blend = [(w, IndexedDataset(prefix)) for w, prefix in parse_data_path(data_cfg.data_path)]
    for _, ds in blend:
        ds.vocab_size = vocab_size
    ranges = [split_ranges(data_cfg.split, ds.num_documents) for _, ds in blend]
    splits = []
    for s in range(3):  # a loop, not a comprehension, so warnings point at the caller (stacklevel)
        splits.append(_build_split(blend, ranges, s, seq_len, num_samples[s], data_cfg))
    return splits[0], splits[1], splits[2]


class SampleLoader:
    """Serves batches in dataset order from a saved position, so a resumed run gets exactly the next sample.

    ``batch_size`` is the global batch: rank ``r`` of ``world_size`` data-parallel ranks takes samples
    ``[pos + r * B / ws, pos + (r + 1) * B / ws)`` and the position advances by ``B``. Past the end of
    the dataset the order wraps around.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.position = 0

    def next_batch(self, batch_size: int | None = None) -> torch.Tensor:
        """LongTensor (batch_size / world_size, seq_len + 1): this rank's share of the next global batch."""
        size = batch_size or self.batch_size
        if size % self.world_size:
            raise ValueError(f"global batch size {size} is not divisible by {self.world_size} data-parallel ranks")
        n = len(self.dataset)
        if n == 0:
            raise DataError("cannot draw a batch: the dataset is empty (its split has no documents)")
        local = size // self.world_size
        start = self.position + self.rank * local
        batch = np.stack([self.dataset[(start + j) % n] for j in range(local)])
        self.position += size
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return {"position": self.position, "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("dataset_size", len(self.dataset)) != len(self.dataset):
            warnings.warn(
                f"resuming a loader saved over {state['dataset_size']} samples on one of {len(self.dataset)}: "
                "the data or the number of steps changed, so the sample order differs",
                stacklevel=2,
            )
        self.position = int(state["position"])
