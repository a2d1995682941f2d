"""Helpers for the server tests: a real uvicorn server on 127.0.0.1 in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from mtnlg.config import ModelConfig
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine
from mtnlg.model.gpt import GPT

uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key"  # the API key of the test servers
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free local port; yield its base URL."""
    from mtnlg.serve.connection import uvicorn_config  # uvicorn is the serve extra's: imported once a test runs

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, app.state.limits, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def with_chat_markers(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of ``tokenizer`` with the default chat template's markers as special tokens (as a
    fine-tuned checkpoint's tokenizer has them)."""
    copy = Tokenizer(HFTokenizer.from_str(tokenizer.hf.to_str()))
    ChatTemplate().attach(copy)
    return copy


def tiny_engine(tokenizer) -> Engine:
    """A 2-layer random model behind the engine, its weights large enough (init_std 0.3) for varied text."""
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layers=2, hidden=64, n_heads=4,
                      padded_vocab_multiple=64, init_std=0.3)
    torch.manual_seed(0)
    return Engine(GPT(cfg), tokenizer, max_batch_size=8)
