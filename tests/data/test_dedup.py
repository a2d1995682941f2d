"""Dedup: planted near-duplicates are found, distinct documents kept, estimates match exact Jaccard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mtnlg.cli import main
from mtnlg.data.dedup import DedupConfig, MinHasher, dedup_jsonl, estimated_jaccard, lsh_params

VOCAB = [f"w{i}" for i in range(3000)]


def random_doc(rng: np.random.Generator, n: int = 200) -> list[str]:
    return list(rng.choice(VOCAB, n))


def mutate(words: list[str], k: int, rng: np.random.Generator) -> list[str]:
    """Replace ``k`` evenly spread words with words from outside VOCAB."""
    out = list(words)
    for j, pos in enumerate(np.linspace(5, len(words) - 5, k).astype(int)):
        out[pos] = f"new{j}"
    return out


def exact_jaccard(a: str, b: str, n: int = 5) -> float:
    """The reference: Jaccard similarity of the sets of word 5-grams."""
    def grams(t: str) -> set:
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def test_minhash_estimates_exact_jaccard() -> None:
    rng = np.random.default_rng(0)
    hasher = MinHasher(num_perm=256)
    base = random_doc(rng)
    for k in (0, 2, 6, 15, 40, 200):
        other = mutate(base, k, rng) if k < 200 else random_doc(rng)
        a, b = " ".join(base), " ".join(other)
        est = estimated_jaccard(hasher.signature(a), hasher.signature(b))
        assert est == pytest.approx(exact_jaccard(a, b), abs=0.1)


def test_lsh_parameters_form_an_s_curve_at_the_threshold() -> None:
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128
    collide = lambda s: 1 - (1 - s**rows) ** bands
    assert collide(0.9) > 0.99 and collide(0.5) < 0.05


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "meta": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_planted_duplicates_are_removed_and_distinct_documents_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    distinct = [" ".join(random_doc(rng)) for _ in range(30)]
    base3, base7 = distinct[3].split(), distinct[7].split()
    near = [" ".join(mutate(base3, 2, rng)), " ".join(mutate(base7, 4, rng)).upper()]  # J ~ 0.9, 0.8+
    similar = " ".join(mutate(distinct[11].split(), 12, rng))  # J ~ 0.5: related but not a duplicate
    assert exact_jaccard(near[1], distinct[7]) > 0.8 and exact_jaccard(similar, distinct[11]) < 0.6
    texts = distinct + near + [distinct[5], similar]
    src = _write(tmp_path / "in.jsonl", texts)
    report = dedup_jsonl(src, tmp_path / "out.jsonl")
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [d["meta"] for d in kept] == list(range(30)) + [33]  # originals and the merely similar one
    assert report.removed == {"near duplicate": 2, "exact duplicate": 1}
    assert report.read == 34 and report.kept == 31
    assert any(f"{src}:31: near duplicate of line 4" in e for e in report.examples)
    assert any(f"{src}:33: exact duplicate of line 6" in e for e in report.examples)
    # lines are copied unchanged, other keys included
    assert (tmp_path / "out.jsonl").read_text().splitlines()[0] == src.read_text().splitlines()[0]


def test_quality_filters_and_bad_lines(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": "A perfectly ordinary sentence about birds and trees."}),
             json.dumps({"text": "short"}),
             json.dumps({"text": "#### $$$ %%% &&& ((( ))) *** +++ === @@@ !!!"}),
             "{broken",
             json.dumps({"text": "Another ordinary sentence, this one about rivers and hills."})]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = dedup_jsonl(src, tmp_path / "out.jsonl", DedupConfig(min_chars=10, max_symbol_ratio=0.3))
    assert report.kept == 2
    assert report.removed == {"shorter than 10 characters": 1, "symbol ratio above 0.3": 1,
                              "bad line: malformed JSON": 1}
    # filters off by default: only the bad line goes
    assert dedup_jsonl(src, tmp_path / "out2.jsonl").kept == 4


def test_cli_dedup_writes_a_report(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(2)
    doc = " ".join(random_doc(rng))
    src = _write(tmp_path / "in.jsonl", [doc, " ".join(mutate(doc.split(), 1, rng)), " ".join(random_doc(rng))])
    args = ["dedup", "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--report", str(tmp_path / "r.json")]
    assert main(args) == 0
    assert "removed 1: near duplicate" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["removed"] == {"near duplicate": 1}
    assert main(args + ["--no-near"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["kept"] == 3
    assert main(args + ["--threshold", "1.5"]) == 2
    assert "threshold must be in (0, 1]" in capsys.readouterr().err
