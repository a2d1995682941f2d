"""One very large input (a multi-megabyte document, line or record) costs memory in proportion to
what is kept of it, not gigabytes: each case runs in a fresh process whose peak RSS is checked
against a stated bound, ``BOUND_MB``. Measured on these 4 MB inputs before the fix (one encode
call for the whole text, no cut before tokenizing): preprocess 955 MB, evaluate's encoding
1027 MB, finetune's reading of the record 959 MB; after it 309, about 300, and 238 MB."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mtnlg.data.tokenizer import Tokenizer, pieces

BOUND_MB = 520  # of which a fresh process with torch and mtnlg imported is about 300 MB

_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); print(r.stderr[-2000:]); "
         "sys.exit(r.returncode)")


def peak_mb(*command: str) -> int:
    """The peak RSS, in MB, of ``command`` run in a process of its own (no other child is waited for)."""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", _PEAK, *command], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return int(done.stdout.split()[0])


def _text(chars: int) -> str:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    out, size = [], 0
    while size < chars:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("big")
    text = _text(4_000_000)
    small_tokenizer.save(root / "tok")
    (root / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    record = {"messages": [{"role": "user", "content": "Say it all"}, {"role": "assistant", "content": text}]}
    (root / "sft.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    return {"root": root, "tok": root / "tok", "doc": root / "doc.jsonl", "sft": root / "sft.jsonl"}


def test_a_long_text_is_encoded_in_pieces_with_the_ids_of_the_whole(small_tokenizer: Tokenizer) -> None:
    text = "The quick brown fox, jumps\nover the lazy dog 42 times; ünïcode 🦊!  " * 300
    cuts = list(pieces(text, 100))
    assert "".join(cuts) == text and max(map(len, cuts)) <= 100 and len(cuts) > len(text) // 100
    assert [i for c in cuts for i in small_tokenizer.hf.encode(c).ids] == small_tokenizer.hf.encode(text).ids


def test_preprocess_of_one_multi_megabyte_line(big: dict[str, Path]) -> None:
    out = big["root"] / "data" / "x"
    peak = peak_mb(sys.executable, "-m", "mtnlg", "preprocess", "--input", str(big["doc"]), "--tokenizer",
                   str(big["tok"]), "--output-prefix", str(out), "--quiet")
    assert peak < BOUND_MB, f"preprocess of a 4 MB line peaked at {peak} MB"
    assert out.with_suffix(".bin").stat().st_size > 1_000_000


def test_evaluate_encodes_a_multi_megabyte_document_in_bounded_memory(big: dict[str, Path]) -> None:
    """What ``mtnlg evaluate --task perplexity`` does with its documents before scoring them."""
    code = ("import sys; from mtnlg.util.memory import return_freed_memory; "
            "from mtnlg.data.tokenizer import Tokenizer; "
            "from mtnlg.eval.evaluate import EvalSpec, read_task; return_freed_memory(); "
            "tok = Tokenizer.load(sys.argv[2]); docs = read_task(EvalSpec('perplexity', sys.argv[1])); "
            "print(sum(len(tok.encode(d)) for d in docs))")
    peak = peak_mb(sys.executable, "-c", code, str(big["doc"]), str(big["tok"]))
    assert peak < BOUND_MB, f"encoding a 4 MB document peaked at {peak} MB"


def test_finetune_cuts_a_multi_megabyte_record_before_tokenizing(big: dict[str, Path]) -> None:
    code = ("import sys; from mtnlg.data.sft import read_records; from mtnlg.data.tokenizer import Tokenizer; "
            "from mtnlg.data.chat_template import ChatTemplate; tok = Tokenizer.load(sys.argv[2]); "
            "ChatTemplate().attach(tok); records, report = read_records([sys.argv[1]], tok, 257, 0); "
            "assert report.truncated == 1 and len(records[0].tokens) == 257")
    peak = peak_mb(sys.executable, "-c", code, str(big["sft"]), str(big["tok"]))
    assert peak < BOUND_MB, f"reading a 4 MB record to keep 257 tokens peaked at {peak} MB"
