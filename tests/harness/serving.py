"""Helpers for the server tests: a real uvicorn server on 127.0.0.1 in a thread."""

from __future__ import annotations

import socket
import subprocess
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


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a server started as a command)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float) -> None:
    """Wait until the server that ``proc`` started answers ``GET base/health`` with 200; fail with its
    output if it exits first, or after ``timeout`` seconds (a loaded 2-core machine took 88 s to
    start ``mtnlg serve``)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout is not None else ""
            pytest.fail(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}:\n"
                        f"{out.decode(errors='replace') if isinstance(out, bytes) else out}")
        assert time.monotonic() < deadline, f"{' '.join(map(str, proc.args))} did not come up in {timeout:g} s"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


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
