"""Shared test fixtures: small models and tokenizers built locally (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores on CI: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def small_model_config():
    from mtnlg.config import ModelConfig

    return ModelConfig(vocab_size=300, seq_len=64, n_layers=2, hidden=64, n_heads=4, padded_vocab_multiple=64)


@pytest.fixture(scope="session")
def small_tokenizer():
    """A 400-token byte-level BPE trained on a few lines of text."""
    from mtnlg.data.tokenizer import Tokenizer

    text = ["The quick brown fox jumps over the lazy dog. " * 8, "Pack my box with five dozen liquor jugs. " * 8]
    return Tokenizer.train(text, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A directory with ``tok/`` (a 512-token BPE of two modules' documentation) and ``data/py``,
    its indexed dataset: what `mtnlg train --tokenizer ... --data-path ...` needs, in seconds."""
    from mtnlg.data.corpus import build_corpus
    from mtnlg.data.preprocess import preprocess
    from mtnlg.data.tokenizer import Tokenizer, iter_text_files

    root = tmp_path_factory.mktemp("tiny-corpus")
    build_corpus(root / "corpus.jsonl", modules=["json", "textwrap"])
    Tokenizer.train(iter_text_files([root / "corpus.jsonl"]), vocab_size=512).save(root / "tok")
    preprocess([root / "corpus.jsonl"], root / "tok", root / "data" / "py", progress=False)
    return root


@pytest.fixture(scope="session")
def train_data_flags(tiny_corpus):
    """``tiny_corpus`` as `mtnlg train` flags."""
    return ["--tokenizer", str(tiny_corpus / "tok"), "--data-path", str(tiny_corpus / "data" / "py")]
