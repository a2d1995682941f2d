"""The Megatron MMIDIDX format: round trips, the exact bytes, and clear errors on damaged files."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtnlg.data.indexed import DataError, IndexedDataset, IndexedDatasetWriter, token_dtype


def _write(prefix: Path, docs: list[list[int]], dtype: np.dtype) -> IndexedDataset:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            w.add_document(doc)
        w.finalize()
    return IndexedDataset(prefix)


@settings(max_examples=40, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(0, 65535), max_size=40), max_size=20),
    wide=st.booleans(),
)
def test_round_trip_random_documents(docs: list[list[int]], wide: bool) -> None:
    dtype = np.dtype(np.int32 if wide else np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        ds = _write(Path(tmp) / "x", docs, dtype)
        assert ds.dtype == dtype
        assert len(ds) == ds.num_documents == len(docs)
        assert ds.sizes.tolist() == [len(d) for d in docs]
        assert ds.num_tokens == sum(len(d) for d in docs)
        for i, doc in enumerate(docs):
            assert ds[i].tolist() == doc
            assert ds.document(i).tolist() == doc
        if docs:
            assert ds[-1].tolist() == docs[-1]


def test_reading_is_a_zero_copy_view(tmp_path: Path) -> None:
    ds = _write(tmp_path / "x", [[1, 2, 3], [4, 5, 6, 7]], np.uint16)
    seq = ds[1]
    assert np.shares_memory(seq, ds._bin)  # a view of the memory map, not a copy
    assert not seq.flags.writeable and not seq.flags.owndata
    assert ds.get(1, offset=1, length=2).tolist() == [5, 6]
    with pytest.raises(IndexError):
        ds.get(1, offset=3, length=2)
    with pytest.raises(IndexError):
        ds[2]


def test_bytes_match_a_hand_built_megatron_file(tmp_path: Path) -> None:
    """Two documents [1, 2, 3] and [4, 5] as uint16, laid out field by field like Megatron's writer."""
    _write(tmp_path / "x", [[1, 2, 3], [4, 5]], np.uint16)
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # dtype code of uint16
        + struct.pack("<Q", 2)  # sequences
        + struct.pack("<Q", 3)  # document-index entries (documents + 1)
        + struct.pack("<2i", 3, 2)  # sizes
        + struct.pack("<2q", 0, 6)  # byte pointers
        + struct.pack("<3q", 0, 1, 2)  # document index
    )
    assert (tmp_path / "x.idx").read_bytes() == expected_idx
    assert (tmp_path / "x.bin").read_bytes() == struct.pack("<5H", 1, 2, 3, 4, 5)


def test_reads_a_megatron_file_with_several_sentences_per_document(tmp_path: Path) -> None:
    """Megatron's --split-sentences: document 0 is two sequences, document 1 one; int32 tokens (code 4)."""
    sizes, docs = [2, 1, 3], [0, 2, 3]
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, len(sizes), len(docs))
    (tmp_path / "m.idx").write_bytes(
        header + struct.pack("<3i", *sizes) + struct.pack("<3q", 0, 8, 12) + struct.pack("<3q", *docs)
    )
    (tmp_path / "m.bin").write_bytes(struct.pack("<6i", 10, 11, 12, 70000, 71000, 72000))
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.int32 and len(ds) == 3 and ds.num_documents == 2
    assert ds[1].tolist() == [12]
    assert ds.document(0).tolist() == [10, 11, 12]
    assert ds.document(1).tolist() == [70000, 71000, 72000]
    # and our writer produces the same bytes for the same content
    with IndexedDatasetWriter(tmp_path / "w", np.int32) as w:
        w.add_document([10, 11, 12], sequence_lengths=[2, 1])
        w.add_document([70000, 71000, 72000])
        w.finalize()
    assert (tmp_path / "w.idx").read_bytes() == (tmp_path / "m.idx").read_bytes()
    assert (tmp_path / "w.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()


def test_token_dtype_follows_megatron() -> None:
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(256000) == np.int32


def test_add_documents_batch_equals_one_by_one(tmp_path: Path) -> None:
    docs = [[1, 2], [3], [4, 5, 6]]
    _write(tmp_path / "a", docs, np.uint16)
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:
        w.add_documents(np.array([1, 2, 3, 4, 5, 6]), np.array([2, 1, 3]))
        w.finalize()
    for suffix in (".idx", ".bin"):
        assert (tmp_path / f"b{suffix}").read_bytes() == (tmp_path / f"a{suffix}").read_bytes()


def test_empty_dataset(tmp_path: Path) -> None:
    ds = _write(tmp_path / "e", [], np.uint16)
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_ids_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w, pytest.raises(ValueError, match="do not fit"):
        w.add_document([1, 70000])


def test_failed_write_leaves_nothing_and_keeps_the_old_dataset(tmp_path: Path) -> None:
    _write(tmp_path / "x", [[1, 2]], np.uint16)
    old = (tmp_path / "x.bin").read_bytes(), (tmp_path / "x.idx").read_bytes()
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
        w.add_document([7, 8, 9])
        raise RuntimeError("crash mid-way")
    assert ((tmp_path / "x.bin").read_bytes(), (tmp_path / "x.idx").read_bytes()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]


def test_damaged_files_are_reported_by_name(tmp_path: Path) -> None:
    _write(tmp_path / "x", [[1, 2, 3], [4, 5]], np.uint16)
    idx, binf = tmp_path / "x.idx", tmp_path / "x.bin"
    good_idx, good_bin = idx.read_bytes(), binf.read_bytes()

    idx.write_bytes(b"NOTMMIDX" + good_idx[8:])
    with pytest.raises(DataError, match=r"x\.idx: not a Megatron MMIDIDX index"):
        IndexedDataset(tmp_path / "x")
    idx.write_bytes(good_idx[:17] + b"\x63" + good_idx[18:])
    with pytest.raises(DataError, match="unknown dtype code 99"):
        IndexedDataset(tmp_path / "x")
    idx.write_bytes(good_idx[:-4])
    with pytest.raises(DataError, match="truncated or corrupt"):
        IndexedDataset(tmp_path / "x")
    idx.write_bytes(good_idx)
    binf.write_bytes(good_bin[:-2])
    with pytest.raises(DataError, match=r"x\.bin: .* truncated"):
        IndexedDataset(tmp_path / "x")
    binf.unlink()
    with pytest.raises(FileNotFoundError, match=r"x\.bin"):
        IndexedDataset(tmp_path / "x")
