"""Byte-level BPE: exact round trip of any Unicode text, GPT-2 file formats, clear errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtnlg.cli import main
from mtnlg.data.tokenizer import EOD_TOKEN, Tokenizer


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_round_trip_is_exact(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_training_learns_merges_and_eod(small_tokenizer):
    assert 257 < small_tokenizer.vocab_size <= 400  # the tiny corpus runs out of pairs before 400
    assert small_tokenizer.token_str(small_tokenizer.eod_id) == EOD_TOKEN
    # Frequent words become single tokens, far shorter than their bytes.
    assert len(small_tokenizer.encode(" quick brown fox")) < len(" quick brown fox") / 2
    # The end-of-document marker written in text is text (no one can end a document by typing it).
    assert small_tokenizer.eod_id not in small_tokenizer.encode(f"a{EOD_TOKEN}b")
    assert small_tokenizer.encode(f"a{EOD_TOKEN}b", specials=[EOD_TOKEN]).count(small_tokenizer.eod_id) == 1


def test_save_load_and_gpt2_files_agree(tmp_path, small_tokenizer):
    small_tokenizer.save(tmp_path / "json")
    small_tokenizer.save_gpt2_files(tmp_path / "gpt2")
    assert json.loads((tmp_path / "gpt2" / "vocab.json").read_text())[EOD_TOKEN] == small_tokenizer.eod_id
    text = "The lazy dog, 🦊 and ünïcode\n\tend"
    for d in ("json", "gpt2"):
        tok = Tokenizer.load(tmp_path / d)
        assert tok.encode(text) == small_tokenizer.encode(text)
        assert tok.eod_id == small_tokenizer.eod_id


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_cli_train_and_encode(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"document {i} about tokenizers"}) for i in range(50)) + "\nbad{\n")
    out_dir = str(tmp_path / "t")
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", out_dir]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "t"), "--text", "document 7"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "".join(out["tokens"]) == "document 7"
