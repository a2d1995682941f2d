"""The embedded corpus: Python's own documentation, deterministic; or any folder of text files."""

from __future__ import annotations

import inspect
import json
import math
import textwrap
from pathlib import Path

from mtnlg.cli import main
from mtnlg.data.corpus import build_corpus


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_full_embedded_corpus(tmp_path: Path) -> None:
    stats = build_corpus(tmp_path / "c.jsonl")
    docs = read(tmp_path / "c.jsonl")
    assert len(docs) == stats.documents > 500
    assert stats.bytes == (tmp_path / "c.jsonl").stat().st_size > 2_000_000  # megabytes of prose
    sources = {d["source"] for d in docs}
    assert {"topic:assert", "module:json", "module:builtins", "file:LICENSE.txt"} <= sources
    assert all(d["text"].strip() for d in docs)
    assert not any(s.startswith("module:test.") for s in sources)  # the test suite is not documentation


def test_deterministic_and_taken_from_the_real_docstrings(tmp_path: Path) -> None:
    modules = ["textwrap", "json", "math"]
    build_corpus(tmp_path / "a.jsonl", modules=modules)
    build_corpus(tmp_path / "b.jsonl", modules=modules)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    docs = {d["source"]: d["text"] for d in read(tmp_path / "a.jsonl")}
    assert set(docs) >= {"module:textwrap", "module:json", "module:json.decoder", "module:math"}
    assert inspect.cleandoc(textwrap.__doc__) in docs["module:textwrap"]
    assert "textwrap.dedent(text)\n\n" + inspect.cleandoc(textwrap.dedent.__doc__) in docs["module:textwrap"]
    assert inspect.cleandoc(math.sqrt.__doc__) in docs["module:math"]  # compiled module, read via import


def test_from_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text("bee", encoding="utf-8")
    (src / "sub" / "a.md").write_text("# ay", encoding="utf-8")
    (src / "a.txt").write_text("ay", encoding="utf-8")
    (src / "empty.txt").write_text("  \n", encoding="utf-8")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "image.png").write_bytes(b"\x89PNG")
    stats = build_corpus(tmp_path / "c.jsonl", from_dir=src)
    docs = read(tmp_path / "c.jsonl")
    assert [(d["source"], d["text"]) for d in docs] == [
        ("file:a.txt", "ay"), ("file:b.txt", "bee"), ("file:sub/a.md", "# ay")
    ]
    assert len(stats.skipped) == 2 and "not UTF-8" in " ".join(stats.skipped)


def test_cli_corpus(tmp_path: Path, capsys) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.txt").write_text("hello", encoding="utf-8")
    assert main(["corpus", "--out", str(tmp_path / "c.jsonl"), "--from-dir", str(tmp_path / "src")]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert main(["corpus", "--out", str(tmp_path / "d.jsonl"), "--from-dir", str(tmp_path / "nope")]) == 2
    assert "corpus folder not found" in capsys.readouterr().err
