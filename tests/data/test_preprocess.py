"""Preprocessing: tokens equal the tokenizer's own output, workers agree, bad input is counted or refused."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mtnlg.cli import main
from mtnlg.data.indexed import DataError, IndexedDataset
from mtnlg.data.preprocess import _ordered_map, iter_chunks, preprocess

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.\nSecond line, with unicode: café, naïve, 東京.",
    "  leading spaces and trailing ones  ",
    "fox " * 300,
]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_documents_are_tokenizer_output_plus_eod(tmp_path: Path, small_tokenizer) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    report = preprocess([src], small_tokenizer, tmp_path / "out" / "x")
    ds = IndexedDataset(tmp_path / "out" / "x")
    assert ds.dtype == np.uint16 and report.dtype == "uint16"
    assert report.documents == ds.num_documents == len(TEXTS)
    for i, text in enumerate(TEXTS):
        expected = small_tokenizer.hf.encode(text).ids + [small_tokenizer.eod_id]
        assert ds.document(i).tolist() == expected
    assert report.tokens == ds.num_tokens
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.bin", "x.idx"]  # no temporaries left


def test_workers_and_chunking_do_not_change_the_output(tmp_path: Path, small_tokenizer) -> None:
    texts = [f"document {i}: " + "lazy dog " * (i % 7) for i in range(200)]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    preprocess([src], small_tokenizer, tmp_path / "one")
    report = preprocess([src], small_tokenizer, tmp_path / "two", workers=2, chunk_bytes=512)
    assert report.documents == 200
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"two{suffix}").read_bytes() == (tmp_path / f"one{suffix}").read_bytes()


def test_text_files_and_folders(tmp_path: Path, small_tokenizer) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "docs" / "a.md").write_text("# first\n\nfile", encoding="utf-8")
    (tmp_path / "docs" / "ignored.bin").write_bytes(b"\x00\x01")
    write_jsonl(tmp_path / "docs" / "c.jsonl", ["third", "fourth"])
    preprocess([tmp_path / "docs"], small_tokenizer, tmp_path / "x")
    ds = IndexedDataset(tmp_path / "x")
    got = [small_tokenizer.decode(ds.document(d)[:-1]) for d in range(ds.num_documents)]
    assert got == ["# first\n\nfile", "second file", "third", "fourth"]


def _bad_input(path: Path) -> Path:
    lines = [
        b'{"text": "good one"}',  # 1
        b'{"text": "unterminated}',  # 2 malformed JSON
        b'{"body": "wrong key"}',  # 3 missing key
        b'{"text": "caf\xe9"}',  # 4 invalid UTF-8 (latin-1 byte)
        b'{"text": "   "}',  # 5 empty document
        b"",  # 6 blank line: tolerated
        b'{"text": 42}',  # 7 not a string
        b'["text"]',  # 8 not an object
        b'{"text": "good two"}',  # 9
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_lines_are_counted_and_reported_with_file_and_line(tmp_path: Path, small_tokenizer) -> None:
    src = _bad_input(tmp_path / "bad.jsonl")
    report = preprocess([src], small_tokenizer, tmp_path / "x")
    ds = IndexedDataset(tmp_path / "x")
    assert [small_tokenizer.decode(ds.document(d)[:-1]) for d in range(2)] == ["good one", "good two"]
    assert report.documents == 2 and report.blank_lines == 1
    assert report.skipped == {
        "malformed JSON": 1, "missing key 'text'": 1, "invalid UTF-8": 1, "empty document": 1,
        "'text' is not a string": 1, "not a JSON object": 1,
    }
    assert [e.split(": ")[0] for e in report.examples] == [f"{src}:{n}" for n in (2, 3, 4, 5, 7, 8)]
    summary = report.summary()
    assert "skipped 6 lines" in summary and f"{src}:4: invalid UTF-8" in summary


def test_strict_mode_stops_at_the_first_bad_line_and_writes_nothing(tmp_path: Path, small_tokenizer) -> None:
    src = _bad_input(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=rf"{src}:2: malformed JSON"):
        preprocess([src], small_tokenizer, tmp_path / "out" / "x", strict=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_json_key_option(tmp_path: Path, small_tokenizer) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ["alpha", "beta"], key="content")
    report = preprocess([src], small_tokenizer, tmp_path / "x", json_key="content")
    assert report.documents == 2 and not report.skipped


def test_ordered_map_keeps_a_bounded_number_of_chunks_in_flight() -> None:
    """The input is read only as fast as results are consumed: memory does not grow with input size."""
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(100):
            pulled += 1
            yield i

    with ThreadPoolExecutor(2) as pool:
        for consumed, result in enumerate(_ordered_map(lambda x: x * 2, items(), pool, window=4), start=1):
            assert result == 2 * (consumed - 1)  # input order is kept
            assert pulled - consumed <= 4


def test_chunks_stream_lines_with_their_numbers(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [f"doc {i}" for i in range(50)])
    chunks = list(iter_chunks([src], chunk_bytes=100))
    assert len(chunks) > 5 and all(c.nbytes < 100 + 40 for c in chunks)
    assert [c.first_line for c in chunks] == list(np.cumsum([1] + [len(c.lines) for c in chunks[:-1]]))
    assert b"".join(line for c in chunks for line in c.lines) == src.read_bytes()


def test_cli_preprocess(tmp_path: Path, small_tokenizer, capsys) -> None:
    small_tokenizer.save(tmp_path / "tok")
    src = _bad_input(tmp_path / "bad.jsonl")
    args = ["preprocess", "--input", str(src), "--tokenizer", str(tmp_path / "tok"), "--quiet",
            "--output-prefix", str(tmp_path / "x")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "skipped 6 lines" in out
    assert main(args + ["--strict"]) == 2
    assert f"{src}:2: malformed JSON" in capsys.readouterr().err
    assert main(["preprocess", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                 "--output-prefix", str(tmp_path / "y")]) == 2
    assert "input not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"\x00\xff\xfe\x80binary" * 50, "invalid UTF-8"), (b"", "empty"), (b"\n\n  \n", "only blank lines"),
     (b'{"txt": "x"}\nnot json\n[1]\n', "every line was bad")],
)
def test_no_surviving_document_is_an_error_and_writes_nothing(tmp_path: Path, small_tokenizer, content: bytes,
                                                              why: str) -> None:
    src = tmp_path / ("in.bin" if b"binary" in content else "in.jsonl")
    src.write_bytes(content)
    with pytest.raises(DataError, match=f"no document.*{why}.*nothing was written"):
        preprocess([src], small_tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_an_output_prefix_naming_a_directory_is_refused(tmp_path: Path, small_tokenizer, capsys) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    (tmp_path / "existing").mkdir()
    for prefix in (f"{tmp_path}/dir/", str(tmp_path / "existing"), "."):
        with pytest.raises(DataError, match="names a directory"):
            preprocess([src], small_tokenizer, prefix)
    assert not (tmp_path / "dir").exists() and not list((tmp_path / "existing").iterdir())
    small_tokenizer.save(tmp_path / "tok")
    args = ["preprocess", "--input", str(src), "--tokenizer", str(tmp_path / "tok"), "--quiet"]
    assert main(args + ["--output-prefix", f"{tmp_path}/dir/"]) == 2
    err = capsys.readouterr().err
    assert "names a directory" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["preprocess", "--input", str(empty), "--tokenizer", str(tmp_path / "tok"), "--quiet",
                 "--output-prefix", str(tmp_path / "o")]) == 2
    assert "input is empty" in capsys.readouterr().err
