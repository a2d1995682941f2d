"""Sampling across documents, splits, caching, blending proportions and the resumable loader."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mtnlg.config import DataConfig
from mtnlg.data.gpt_dataset import (
    BlendedDataset,
    GPTDataset,
    SampleLoader,
    blending_indices,
    build_datasets,
    parse_data_path,
    split_ranges,
)
from mtnlg.data.indexed import DataError, IndexedDataset, IndexedDatasetWriter

SEQ = 16


def make_dataset(prefix: Path, num_docs: int, base: int = 0, seed: int = 0) -> list[np.ndarray]:
    """Documents of random length whose tokens are globally unique (token = base + running count)."""
    rng = np.random.default_rng(seed)
    docs, next_token = [], base
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(num_docs):
            n = int(rng.integers(1, 40))
            doc = np.arange(next_token, next_token + n)
            next_token += n
            w.add_document(doc)
            docs.append(doc)
        w.finalize()
    return docs


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    prefix = tmp_path / "data" / "c"
    return prefix, make_dataset(prefix, 60)


def raw_stream(ds: GPTDataset) -> np.ndarray:
    """Concatenate the samples in unshuffled order, dropping the token each shares with the previous one."""
    inverse = np.argsort(ds.shuffle_idx)
    samples = [ds[int(inverse[j])] for j in range(len(ds))]
    return np.concatenate([samples[0]] + [s[1:] for s in samples[1:]])


def test_parse_data_path() -> None:
    assert parse_data_path(["a"]) == [(1.0, "a")]
    (w1, a), (w2, b) = parse_data_path(["3", "a", "1", "b"])
    assert (a, b) == ("a", "b") and w1 == pytest.approx(0.75) and w2 == pytest.approx(0.25)
    for bad, msg in [([], "empty"), (["a", "b"], "should be a weight"), (["0.3", "a", "0.7"], "pairs"),
                     (["-1", "a", "2", "b"], "positive")]:
        with pytest.raises(DataError, match=msg):
            parse_data_path(bad)


def test_split_ranges_partition_the_documents() -> None:
    assert split_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    assert split_ranges("8,2", 10) == [(0, 8), (8, 10), (10, 10)]
    assert split_ranges("1", 7) == [(0, 7), (7, 7), (7, 7)]


def test_samples_are_the_shuffled_document_stream(corpus) -> None:
    prefix, docs = corpus
    ds = GPTDataset(IndexedDataset(prefix), (0, 60), SEQ, num_samples=50, seed=3)
    assert len(ds) >= 50
    assert all(ds[i].shape == (SEQ + 1,) and ds[i].dtype == np.int64 for i in range(len(ds)))
    expected = np.concatenate([docs[d] for d in ds.doc_idx])
    stream = raw_stream(ds)
    assert stream.size == len(ds) * SEQ + 1
    assert np.array_equal(stream, expected[: stream.size])
    # each epoch of the document index is one permutation of the documents
    for e in range(ds.num_epochs):
        assert sorted(ds.doc_idx[e * 60 : (e + 1) * 60].tolist()) == list(range(60))


def test_every_train_token_appears_and_no_document_leaks(corpus) -> None:
    prefix, docs = corpus
    train, valid, test = build_datasets(
        DataConfig(data_path=[str(prefix)], split="7,2,1", seed=5), SEQ, num_samples=(120, 30, 10)
    )
    ranges = split_ranges("7,2,1", 60)
    seen = [set(np.concatenate([d[i] for i in range(len(d))]).tolist()) for d in (train, valid, test)]
    owned = [set(np.concatenate(docs[a:b]).tolist()) for a, b in ranges]
    for s in range(3):
        assert seen[s] <= owned[s], "a split served tokens of another split's documents"
    # train needs several epochs here, so every token of its documents appears
    assert train.num_epochs > 1 and seen[0] == owned[0]
    # the last epoch is shuffled apart: the samples served first all lie in the earlier epochs
    n_first = ((train.num_epochs - 1) * train.tokens_per_epoch - 1) // SEQ
    assert sorted(train.shuffle_idx[:n_first].tolist()) == list(range(n_first))


def test_deterministic_for_a_seed_and_cached(corpus) -> None:
    prefix, _ = corpus
    make = lambda seed: GPTDataset(IndexedDataset(prefix), (0, 60), SEQ, 40, seed, name="train")
    a = make(1)
    cache_files = sorted(p.name for p in prefix.parent.glob("c.train.*"))
    assert len(cache_files) == 4  # doc/sample/shuffle index + description
    b = make(1)  # loaded from the cache
    assert isinstance(b.shuffle_idx, np.memmap)
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    c = make(2)
    assert not all(np.array_equal(a[i], c[i]) for i in range(len(a)))
    # rewriting the data invalidates the cache
    make_dataset(prefix, 60, seed=9)
    d = make(1)
    assert not isinstance(d.shuffle_idx, np.memmap)


def test_cache_dir_option(corpus, tmp_path: Path) -> None:
    prefix, _ = corpus
    build_datasets(DataConfig(data_path=[str(prefix)], cache_dir=str(tmp_path / "cache")), SEQ, (10, 1, 1))
    assert list((tmp_path / "cache").glob("c.train.*.shuffle_idx.npy"))
    assert not list(prefix.parent.glob("*.npy"))


def test_empty_split_gives_an_empty_dataset(corpus) -> None:
    prefix, _ = corpus
    train, valid, test = build_datasets(DataConfig(data_path=[str(prefix)], split="1,0,0"), SEQ, (5, 5, 5))
    assert len(train) >= 5 and len(valid) == 0 and len(test) == 0
    with pytest.raises(DataError, match="empty"):
        SampleLoader(valid, 2).next_batch()


def test_blending_indices_stay_within_one_sample_of_the_weights() -> None:
    rng = np.random.default_rng(0)
    for weights in ([0.3, 0.7], [0.2, 0.3, 0.5], list(rng.dirichlet([1, 1, 1]))):
        d, local = blending_indices(weights, 5000)
        counts = np.cumsum(np.eye(len(weights))[d], axis=0)
        expected = np.arange(1, 5001)[:, None] * np.asarray(weights)
        assert np.abs(counts - expected).max() < 1.0
        for k in range(len(weights)):  # each dataset's samples are taken in order, without gaps
            assert np.array_equal(local[d == k], np.arange((d == k).sum()))


def test_blended_build_datasets_proportions(tmp_path: Path) -> None:
    make_dataset(tmp_path / "a", 30, base=0)
    make_dataset(tmp_path / "b", 50, base=1_000_000, seed=1)
    cfg = DataConfig(data_path=["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")], split="1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # valid/test have no documents
        train, valid, _ = build_datasets(cfg, SEQ, (200, 0, 0))
    assert isinstance(train, BlendedDataset) and len(train) == 200 and len(valid) == 0
    from_b = np.array([train[i][0] >= 1_000_000 for i in range(200)])
    assert np.all(np.abs(np.cumsum(from_b) - 0.7 * np.arange(1, 201)) < 1.0)
    for i in range(200):  # samples never mix sources
        s = train[i]
        assert (s >= 1_000_000).all() or (s < 1_000_000).all()


def test_blending_schedule_is_cached_like_the_sample_indices(tmp_path: Path, monkeypatch) -> None:
    """The schedule is computed once per (weights, size) and read back at the next start."""
    import mtnlg.data.gpt_dataset as gd

    make_dataset(tmp_path / "a", 30, base=0)
    make_dataset(tmp_path / "b", 50, base=1_000_000, seed=1)
    cfg = DataConfig(data_path=["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")], split="1",
                     cache_dir=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # valid/test have no documents
        first = build_datasets(cfg, SEQ, (200, 0, 0))[0]
        assert len(list((tmp_path / "cache").glob("blend.train.*.dataset_index.npy"))) == 1

        def not_again(*args: object) -> None:
            raise AssertionError("the blending schedule was recomputed")

        monkeypatch.setattr(gd, "blending_indices", not_again)
        again = build_datasets(cfg, SEQ, (200, 0, 0))[0]
    assert np.array_equal(again.dataset_index, first.dataset_index)
    assert all(np.array_equal(again[i], first[i]) for i in range(200))


def test_loader_resumes_with_exactly_the_next_sample(corpus) -> None:
    prefix, _ = corpus
    ds = GPTDataset(IndexedDataset(prefix), (0, 60), SEQ, 40, seed=0)
    full = SampleLoader(ds, batch_size=4)
    batches = [full.next_batch() for _ in range(5)]
    assert batches[0].dtype == torch.long and batches[0].shape == (4, SEQ + 1)
    first = SampleLoader(ds, batch_size=4)
    for _ in range(2):
        first.next_batch()
    state = first.state_dict()
    assert state["position"] == 8
    resumed = SampleLoader(ds, batch_size=4)
    resumed.load_state_dict(state)
    for b in batches[2:]:
        assert torch.equal(resumed.next_batch(), b)


def test_loader_splits_the_global_batch_across_ranks_and_ramps_up(corpus) -> None:
    prefix, _ = corpus
    ds = GPTDataset(IndexedDataset(prefix), (0, 60), SEQ, 40, seed=0)
    single = SampleLoader(ds, batch_size=4)
    ranks = [SampleLoader(ds, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for size in (4, 8, 2):  # batch-size ramp-up changes the global batch between steps
        whole = single.next_batch(size)
        parts = [loader.next_batch(size) for loader in ranks]
        assert parts[0].shape[0] == size // 2
        assert torch.equal(torch.cat(parts), whole)
    assert single.state_dict()["position"] == ranks[1].state_dict()["position"] == 14
    with pytest.raises(ValueError, match="not divisible"):
        ranks[0].next_batch(3)


def test_loader_wraps_around_the_end(corpus) -> None:
    prefix, _ = corpus
    ds = GPTDataset(IndexedDataset(prefix), (0, 60), SEQ, 1, seed=0)
    loader = SampleLoader(ds, batch_size=len(ds) + 2)
    batch = loader.next_batch()
    assert torch.equal(batch[-2:], batch[:2])
