"""``mtnlg curate`` on tiny corpora: fuzzy and exact dedup (planted near-duplicates at known Jaccard
similarities), the same kept set whatever the sharding and workers, resuming after a failed task,
decontamination, PII redaction, language ID, tokenizing, and ``mtnlg merge``."""

from __future__ import annotations

import json
import os
import random
import signal
import string
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datatrove")

from mtnlg.cli import main  # noqa: E402
from mtnlg.data.curate.cluster import components, lsh_bands  # noqa: E402
from mtnlg.data.curate.filters import luhn_valid  # noqa: E402
from mtnlg.data.curate.pipeline import CurateConfig, run_curation  # noqa: E402
from mtnlg.data.indexed import DataError, IndexedDataset  # noqa: E402


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def planted_corpus(seed: int = 0, originals: int = 80) -> tuple[list[dict], list[tuple[str, str, float]]]:
    """Random documents of letters-only words, and edited copies of some of them at known Jaccard
    similarities (words replaced at random positions); returns the records in order and the
    planted (original id, copy id, similarity) pairs."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(5000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(300)) for _ in range(originals)]
    records = [{"id": f"doc{i}", "text": t, "source": "a" if i % 2 else "b"} for i, t in enumerate(docs)]
    planted = []
    for i in range(originals):
        edits = [0, 1, 3, 5, 6, 6, 18, 30][i % 8]  # J from 1.0 down to about 0.35, many just above 0.8
        words = docs[i].split()
        for pos in rng.sample(range(300), edits):
            words[pos] = rng.choice(vocab)
        copy = " ".join(words)
        planted.append((f"doc{i}", f"copy{i}", jaccard(docs[i], copy)))
        records.append({"id": f"copy{i}", "text": copy, "source": "c"})
    return records, planted


def write_shards(folder: Path, records: list[dict], shards: int) -> Path:
    """The records split into ``shards`` consecutive files (so the input order stays the same)."""
    folder.mkdir(parents=True)
    bounds = np.linspace(0, len(records), shards + 1).astype(int)
    for s in range(shards):
        with open(folder / f"part-{s}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records[bounds[s]:bounds[s + 1]])
    return folder


def kept(output: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(output.glob("*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, list[dict], list[tuple[str, str, float]]]:
    records, pairs = planted_corpus()
    root = tmp_path_factory.mktemp("planted")
    write_shards(root / "one", records, 1)
    write_shards(root / "four", records, 4)
    return root, records, pairs


def test_planted_near_duplicates_are_found_and_nothing_below_0_6_is_removed(planted) -> None:
    root, records, pairs = planted
    stats = run_curation(CurateConfig([str(root / "four")], str(root / "out-4x1"), progress=False))
    ids = {r["id"] for r in kept(root / "out-4x1")}
    above = [(a, b) for a, b, j in pairs if j >= 0.8]
    below = [(a, b) for a, b, j in pairs if j < 0.6]
    assert len(above) >= 55 and len(below) >= 15
    assert sum(j < 0.85 for *_, j in pairs if j >= 0.8) >= 20  # many just above the threshold
    assert all(a in ids for a, _, _ in pairs)  # the first of each cluster (the original) is kept
    found = sum(b not in ids for _, b in above) / len(above)
    assert found >= 0.95, f"recall {found:.2f}"
    assert all(b in ids for _, b in below)
    assert stats["summary"]["removed: exact duplicate"] == sum(j == 1.0 for *_, j in pairs)
    assert stats["summary"]["kept"] == len(ids) == stats["summary"]["read"] - stats["duplicates"]["removed"]
    original = {r["id"]: r for r in records}
    assert all(r == original[r["id"]] for r in kept(root / "out-4x1"))  # records unchanged, fields kept


def reference(root: Path) -> list[dict]:
    """The kept records of the planted corpus in 4 shards, 1 worker (run once per module)."""
    if not (root / "out-4x1" / "stats.json").is_file():
        run_curation(CurateConfig([str(root / "four")], str(root / "out-4x1"), progress=False))
    return kept(root / "out-4x1")


def test_the_kept_set_is_the_same_for_1_and_4_shards_and_1_and_2_workers(planted) -> None:
    root, _, _ = planted
    run_curation(CurateConfig([str(root / "one")], str(root / "out-1x1"), progress=False))
    run_curation(CurateConfig([str(root / "four")], str(root / "out-4x2"), workers=2, progress=False))
    assert kept(root / "out-1x1") == reference(root) and kept(root / "out-4x2") == reference(root)


def staged_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / ".curate/staged").iterdir()}


def test_a_failed_task_is_redone_alone_and_the_output_equals_an_uninterrupted_run(tmp_path: Path, planted) -> None:
    root, records, _ = planted
    shards = write_shards(tmp_path / "in", records, 4)
    good = (shards / "part-2.jsonl").read_bytes()
    first, rest = good.split(b"\n", 1)
    (shards / "part-2.jsonl").write_bytes(first + b"\n{not json\n" + rest)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"part-2.jsonl:2: malformed JSON"):
        run_curation(CurateConfig([str(shards)], str(out), strict=True, progress=False))
    markers = out / ".curate/logs/1-prepare/completions"
    assert sorted(p.name for p in markers.iterdir()) == ["00000", "00001"]  # task 2 died after writing a part
    before = staged_times(out)
    (shards / "part-2.jsonl").write_bytes(good)
    run_curation(CurateConfig([str(shards)], str(out), strict=True, progress=False))
    after = staged_times(out)
    assert [after[n] == before[n] for n in ("00000.jsonl", "00001.jsonl")] == [True, True]  # not redone
    assert kept(out) == reference(root)
    with pytest.raises(DataError, match="other settings"):
        run_curation(CurateConfig([str(shards)], str(out), threshold=0.7, progress=False))


def test_a_killed_run_resumes_to_the_output_of_an_uninterrupted_one(tmp_path: Path, planted) -> None:
    """SIGKILL while task 2 reads its shard (a named pipe fed half the lines, then held open)."""
    root, records, _ = planted
    shards = write_shards(tmp_path / "in", records, 4)
    lines = (shards / "part-2.jsonl").read_bytes().splitlines(keepends=True)
    (shards / "part-2.jsonl").unlink()
    os.mkfifo(shards / "part-2.jsonl")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    inputs = [str(shards / f"part-{i}.jsonl") for i in range(4)]
    run = subprocess.Popen([sys.executable, "-m", "mtnlg", "curate", "--input", *inputs, "--output", str(out),
                            "--quiet"], env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # the write end opens once task 2 has opened the read end (ENXIO before)
            try:
                pipe = os.open(shards / "part-2.jsonl", os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert run.poll() is None and time.monotonic() < deadline, "task 2 never opened its shard"
                time.sleep(0.05)
        os.set_blocking(pipe, True)
        os.write(pipe, b"".join(lines[: len(lines) // 2]))
        markers = out / ".curate/logs/1-prepare/completions"
        assert sorted(p.name for p in markers.iterdir()) == ["00000", "00001"]
        time.sleep(0.5)  # task 2 reads what the pipe holds and waits for more
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    os.close(pipe)
    before = staged_times(out)
    (shards / "part-2.jsonl").unlink()
    (shards / "part-2.jsonl").write_bytes(b"".join(lines))
    run_curation(CurateConfig([str(shards)], str(out), progress=False))
    after = staged_times(out)
    assert [after[n] == before[n] for n in ("00000.jsonl", "00001.jsonl")] == [True, True]  # not redone
    assert kept(out) == reference(root)


def test_contamination_is_removed_or_reported_per_task(tmp_path: Path) -> None:
    item = "the quick brown fox jumps over the lazy dog while the farmer sleeps in the barn"
    (tmp_path / "cloze.jsonl").write_text(json.dumps({"text": item + " tonight"}) + "\n")
    choice = {"context": "pick one", "choices": ["a", "b"], "label": 0}
    (tmp_path / "choice.jsonl").write_text(json.dumps(choice) + "\n")
    docs = [f"intro words here {item[:70]} and more", "an unrelated document about sailing boats on a lake",
            "the quick brown fox jumps over the lazy dog only"]
    write_shards(tmp_path / "in", [{"text": t, "n": i} for i, t in enumerate(docs)], 1)
    tasks = [str(tmp_path / "cloze.jsonl"), str(tmp_path / "choice.jsonl")]
    common = dict(dedup=False, decontaminate=tasks, progress=False)
    stats = run_curation(CurateConfig([str(tmp_path / "in")], str(tmp_path / "out"), **common))
    assert [r["n"] for r in kept(tmp_path / "out")] == [1, 2]  # 13 shared words remove, 9 do not
    assert stats["summary"]["cloze: contaminated documents"] == 1
    assert stats["summary"]["removed: contamination"] == 1
    assert stats["1-prepare"]["mtnlg: decontamination"]["choice: items shorter than 13 words"] == 1
    report = run_curation(CurateConfig([str(tmp_path / "in")], str(tmp_path / "report"), report_only=True, **common))
    assert len(kept(tmp_path / "report")) == 3 and report["summary"]["cloze: contaminated documents"] == 1


def test_pii_is_redacted_and_nothing_else_changes(tmp_path: Path) -> None:
    texts = [
        "Write to jane.doe@example.com or call +1 415 555 0132 today.",
        "Server 8.8.8.8 answered; the router 192.168.1.1 did not.",
        "Card 4111 1111 1111 1111 paid, 4111 1111 1111 1112 was refused on 2024-05-01.",
        "Nothing personal in this line, only 12345 apples.",
    ]
    expected = [
        "Write to <EMAIL> or call <PHONE> today.",
        "Server <IP_ADDRESS> answered; the router 192.168.1.1 did not.",
        "Card <CARD_NUMBER> paid, 4111 1111 1111 1112 was refused on 2024-05-01.",
        texts[3],
    ]
    write_shards(tmp_path / "in", [{"text": t, "id": i, "meta": {"k": [1]}} for i, t in enumerate(texts)], 2)
    stats = run_curation(CurateConfig([str(tmp_path / "in")], str(tmp_path / "out"), dedup=False, redact_pii=True,
                                      progress=False))
    assert kept(tmp_path / "out") == [{"text": t, "id": i, "meta": {"k": [1]}} for i, t in enumerate(expected)]
    s = stats["summary"]
    assert (s["pii email"], s["pii phone"], s["pii ip_address"], s["pii card_number"]) == (1, 1, 1, 1)
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_language_id_keeps_the_chosen_languages(tmp_path: Path) -> None:
    texts = {
        "en": "The committee will publish its annual report on the state of the rivers next week.",
        "de": "Der Ausschuss wird nächste Woche seinen jährlichen Bericht über den Zustand der Flüsse veröffentlichen.",
        "fr": "Le comité publiera la semaine prochaine son rapport annuel sur l'état des rivières.",
        "es": "El comité publicará la próxima semana su informe anual sobre el estado de los ríos.",
    }
    write_shards(tmp_path / "in", [{"text": t, "lang": k} for k, t in texts.items()], 1)
    stats = run_curation(CurateConfig([str(tmp_path / "in")], str(tmp_path / "out"), dedup=False,
                                      languages=["en", "de"], progress=False))
    assert [r["lang"] for r in kept(tmp_path / "out")] == ["en", "de"]
    assert {k: stats["summary"][f"language {k}"] for k in texts} == dict.fromkeys(texts, 1)
    assert stats["summary"]["removed: language"] == 2


def test_tokenized_shards_merge_into_their_concatenation(tmp_path: Path, small_tokenizer, capsys) -> None:
    small_tokenizer.save(tmp_path / "tok")
    records = [{"text": f"The quick brown fox number {i} jumps over the lazy dog {i * i}."} for i in range(9)]
    write_shards(tmp_path / "in", records, 3)
    assert main(["curate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-dedup",
                 "--tokenizer", str(tmp_path / "tok"), "--quiet"]) == 0
    assert '"kept": 9' in capsys.readouterr().out
    shards = [str(tmp_path / "out" / "tokens" / f"{r:05d}") for r in range(3)]
    assert main(["merge", *shards, "--output-prefix", str(tmp_path / "merged")]) == 0
    merged = IndexedDataset(tmp_path / "merged")
    parts = [IndexedDataset(p)[i] for p in shards for i in range(len(IndexedDataset(p)))]
    assert len(merged) == merged.num_documents == 9
    assert all(np.array_equal(merged[i], parts[i]) for i in range(9))
    expected = [small_tokenizer.encode(r["text"]) + [small_tokenizer.eod_id] for r in records]
    assert [merged[i].tolist() for i in range(9)] == expected
    with warnings.catch_warnings():  # megatron-core warns that Transformer Engine and Apex are absent
        warnings.simplefilter("ignore")
        megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    theirs = megatron.IndexedDataset(str(tmp_path / "merged"))
    assert [theirs[i].tolist() for i in range(len(theirs))] == expected
    assert theirs.document_indices.tolist() == list(range(10))


def test_without_datatrove_the_command_says_what_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    import sys

    for name in [m for m in sys.modules if m.startswith(("mtnlg.data.curate", "datatrove"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "datatrove", None)
    assert main(["curate", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "pip install -e '.[curate]'" in capsys.readouterr().err


def test_lsh_bands_and_components() -> None:
    bands, rows = lsh_bands(0.8, 128)
    assert bands * rows <= 128 and 1 - (1 - 0.8**rows) ** bands >= 0.99
    edges = np.array([[3, 1], [1, 4], [0, 2]])
    assert components(edges, 6).tolist() == [0, 1, 0, 1, 1, 5]
