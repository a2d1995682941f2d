"""Inputs that used to end a run with a traceback, or train on the wrong data, end in one line naming
the file and what is wrong (or, for one bad record, are skipped as a bad line)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mtnlg.cli import main
from mtnlg.config import DataConfig
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.gpt_dataset import SampleLoader, build_datasets
from mtnlg.data.indexed import DataError, IndexedDataset, IndexedDatasetWriter
from mtnlg.data.sft import read_records
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.eval.data import read_documents

SURROGATE = '{"text": "half a pair: \\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}'
DEEP = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"


def test_a_lone_surrogate_or_deep_nesting_is_a_bad_line(tmp_path: Path, small_tokenizer: Tokenizer,
                                                        capsys: pytest.CaptureFixture) -> None:
    good = json.dumps({"text": "a good document", "messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]})
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good, SURROGATE, DEEP, good]) + "\n", encoding="utf-8")
    tok = Tokenizer.load(small_tokenizer.save(tmp_path / "tok"))
    ChatTemplate().attach(tok)
    records, report = read_records([path], tok, 64, max_bad=5)  # finetune: skipped, counted
    assert len(records) == 2 and report.skipped == Counter({"invalid Unicode": 1, "malformed JSON": 1})
    assert f"{path}:3: malformed JSON (nested too deeply)" in report.summary()
    assert main(["preprocess", "--input", str(path), "--tokenizer", str(tmp_path / "tok"),
                 "--output-prefix", str(tmp_path / "data" / "x"), "--quiet"]) == 0
    assert "skipped 2 lines (invalid Unicode: 1, malformed JSON: 1)" in capsys.readouterr().out
    assert IndexedDataset(tmp_path / "data" / "x").num_documents == 2
    with pytest.raises(ValueError, match=rf"^{path}:2: invalid Unicode \(an unpaired UTF-16 surrogate"):
        read_documents(path)  # evaluate stops at a bad line, with one line


def _write(prefix: Path, docs: list[list[int]]) -> Path:
    writer = IndexedDatasetWriter(prefix, np.uint16)
    for d in docs:
        writer.add_document(d)
    writer.finalize()
    return prefix


def test_token_ids_beyond_the_vocabulary_are_named_with_the_file(tmp_path: Path) -> None:
    prefix = _write(tmp_path / "x", [list(range(50)), [1, 2, 3, 400, 5] * 10])
    cfg = DataConfig(data_path=[str(prefix)], split="1,0,0")
    train, _, _ = build_datasets(cfg, seq_len=8, num_samples=(40, 0, 0), vocab_size=300)
    loader = SampleLoader(train, batch_size=4)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'x.bin'}: sequence 1 has token id 400, not below the "
                                        r"model's vocabulary size 300"):
        for _ in range(10):
            loader.next_batch()


def test_an_idx_must_cover_its_bin_exactly(tmp_path: Path, train_data_flags: list[str],
                                           capsys: pytest.CaptureFixture) -> None:
    small = _write(tmp_path / "small", [[1, 2, 3]] * 4)
    big = _write(tmp_path / "big", [[1, 2, 3]] * 6)
    shutil.copy(small.with_suffix(".idx"), big.with_suffix(".idx"))  # an index of a smaller dataset
    with pytest.raises(DataError, match=r"big.bin: 36 bytes, but .*big.idx covers 24: the .bin has more tokens"):
        IndexedDataset(big)
    tokenizer = train_data_flags[:2]
    assert main(["train", *tokenizer, "--data-path", str(big), "--model.seq_len=8", "--model.n_layers=1",
                 "--model.hidden=32", "--model.n_heads=2", "--train.steps=1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "big.idx covers 24" in err, err
