"""The server against abandoned, abusive and slow clients, through a real uvicorn server on 127.0.0.1:
abandoned requests stop generating, the queue is bounded, rows are shared, unfinished heads and
bodies are timed out, the connections are capped, and a foreign ``Host`` is refused.

The model sleeps 10 ms per decode step, so that a long generation lasts long enough to abandon."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest
import torch

from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine
from mtnlg.model.gpt import GPT
from mtnlg.serve.connection import ConnectionLimits
from tests.harness.serving import AUTH

STEP_S = 0.01  # the model's sleep per forward pass
MAX_QUEUED = 24
LIMITS = ConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.0, max_connections=210)


@pytest.fixture(scope="module")
def engine(engine_tokenizer: Tokenizer) -> Engine:
    from mtnlg.config import ModelConfig

    cfg = ModelConfig(vocab_size=engine_tokenizer.vocab_size, seq_len=512, n_layers=1, hidden=32, n_heads=2,
                      padded_vocab_multiple=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.register_forward_hook(lambda *_: time.sleep(STEP_S))
    return Engine(model, engine_tokenizer, max_batch_size=8)


@pytest.fixture(scope="module")
def app_options() -> dict:
    return {"max_queued_sequences": MAX_QUEUED, "limits": LIMITS, "batch_wait_s": 0.01}


def _long(n: int, tokens: int = 400) -> dict:
    return {"prompt": "The quick", "n": n, "max_tokens": tokens, "ignore_eos": True}


def _abandon(url: str, method: str, path: str, body: dict, timeout: float) -> threading.Thread:
    """Send a request from a thread and give up on it after ``timeout`` s (closing the connection)."""
    def go() -> None:
        try:
            httpx.request(method, url + path, json=body, headers=AUTH, timeout=timeout)
        except httpx.TimeoutException:
            pass
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def _until(check: Callable[[], bool], seconds: float) -> float:
    """Poll ``check`` until it holds; returns how long that took (fails past ``seconds``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def _idle(client: httpx.Client) -> bool:
    health = client.get("/health").json()
    return health["running"] == 0 and health["waiting"] == 0


def test_abandoned_requests_stop_generating_and_a_new_one_is_served_promptly(url: str, client: httpx.Client) -> None:
    threads = [_abandon(url, "POST", "/v1/completions", _long(8), 1.0),
               _abandon(url, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "n": 8, "max_tokens": 400, "ignore_eos": True}, 1.0),
               _abandon(url, "PUT", "/api", {"prompts": ["a", "b", "c", "d"], "tokens_to_generate": 400}, 1.0)]
    time.sleep(0.5)
    assert client.get("/health").json()["running"] == 8  # generating for all of them: 20 sequences of 400 tokens
    for t in threads:
        t.join()
    _until(lambda: _idle(client), 2.0)  # at the next step, with slack for a busy machine: not 3 rounds of 4 s
    start = time.monotonic()
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    assert time.monotonic() - start < 2.0


def _post_raw(url: str, body: dict) -> socket.socket:
    """A request sent on a socket of its own; closing the socket abandons it."""
    data = json.dumps(body).encode()
    sock = _connect(url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + AUTH_LINE + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_full_queue_answers_503_with_retry_after_and_rows_are_shared(url: str, client: httpx.Client) -> None:
    holder = _post_raw(url, _long(8, 100))  # holds every row for 100 steps
    _until(lambda: client.get("/health").json()["running"] == 8, 5.0)
    many = _post_raw(url, _long(16, 400))  # 16 waiting: two rounds of 400 steps
    _until(lambda: client.get("/health").json()["waiting"] == 16, 5.0)
    full = client.post("/v1/completions", json={**_long(8), "prompt": ["a", "b"]})  # 16 + 16 > MAX_QUEUED
    assert full.status_code == 503 and full.headers["retry-after"] == "1", full.text
    assert full.json()["error"]["code"] == "queue_full" and "--max-queued-sequences" in full.json()["error"]["message"]
    # Queued after the 16, the short request still gets one of the rows the holder frees: when it is
    # answered, the second half of the 16 is still waiting (in arrival order it would come after all 16).
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    assert client.get("/health").json()["waiting"] >= 7
    holder.close(), many.close()
    _until(lambda: _idle(client), 3.0)


def test_the_request_deadline_ends_a_long_request_with_504(app: object, client: httpx.Client) -> None:
    state = app.state.server
    state.request_timeout_s = 0.5
    try:
        start = time.monotonic()
        r = client.post("/v1/completions", json=_long(1))
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        assert time.monotonic() - start < 3.0
        with client.stream("POST", "/v1/completions", json={**_long(1), "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert "--request-timeout" in events[-2] and events[-1] == "data: [DONE]"
    finally:
        state.request_timeout_s = None
    _until(lambda: _idle(client), 2.0)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_unfinished_heads_and_bodies_time_out_and_connections_are_capped(url: str, client: httpx.Client) -> None:
    partial = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    heads = [_connect(url) for _ in range(200)]
    for s in heads:
        s.sendall(partial)
    body = _connect(url)
    body.sendall(partial + b"Content-Length: 100\r\nContent-Type: application/json\r\n"
                 + AUTH_LINE + b"\r\n" + b'{"prompt"')
    for _ in range(3):  # /health answers throughout
        start = time.monotonic()
        assert client.get("/health").status_code == 200 and time.monotonic() - start < 2.0
        time.sleep(0.2)
    extra = [_connect(url) for _ in range(15)]  # past the cap of 210: refused at once
    refused = [_read_all(s) for s in extra]
    assert sum(r.startswith(b"HTTP/1.1 503") for r in refused) >= 5, refused[-1]
    assert b"--max-connections" in refused[-1]
    start = time.monotonic()
    answers = [_read_all(s) for s in [*heads, body]]
    assert time.monotonic() - start < 4.0  # 1 s after they opened, and slack for a busy machine
    assert all(a.startswith(b"HTTP/1.1 408") and b"--header-timeout" in a for a in answers[:-1]), answers[0]
    assert answers[-1].startswith(b"HTTP/1.1 408") and b"--body-timeout" in answers[-1], answers[-1]
    assert json.loads(answers[-1].split(b"\r\n\r\n", 1)[1])["error"]["code"] == "timeout"
    for s in [*heads, body, *extra]:
        s.close()
    # refused before the app saw a request, yet counted: the heads' 408s and the cap's 503s
    assert _refused(client, "timeout") >= 200 and _refused(client, "too_many_connections") >= 5


def _refused(client: httpx.Client, code: str) -> float:
    """``mtnlg_connections_refused_total{code}`` as ``/metrics`` reports it now (0 if never counted)."""
    prefix = f'mtnlg_connections_refused_total{{code="{code}"}} '
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix):]) if lines else 0.0


AUTH_LINE = f"Authorization: {AUTH['Authorization']}\r\n".encode()


def test_only_loopback_names_are_served_on_loopback(url: str, client: httpx.Client) -> None:
    port = url.rsplit(":", 1)[1]
    r = client.get("/v1/models", headers={"Host": "attacker.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", r.text
    assert client.get("/health", headers={"Host": f"attacker.example:{port}"}).status_code == 400
    for name in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST"):
        assert client.get("/v1/models", headers={"Host": f"{name}:{port}"}).status_code == 200, name


def test_http_edges_answer_in_the_api_shape(url: str, client: httpx.Client) -> None:
    malformed_before = _refused(client, "bad_http")
    bad = _connect(url)
    bad.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n")
    answer = _read_all(bad)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert "malformed HTTP" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    assert _refused(client, "bad_http") == malformed_before + 1
    for path in ("/", "/health"):
        assert httpx.head(url + path).status_code == 200
    # a Host that rebuilds the URL into /health does not skip the key for the route it reaches
    sneaky = _connect(url)
    sneaky.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1/health?\r\nConnection: close\r\n\r\n")
    assert _read_all(sneaky).split(b"\r\n", 1)[0] in (b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 401 Unauthorized")
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 600})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_special_token_text_in_a_prompt_is_plain_text(client: httpx.Client, engine: Engine) -> None:
    r = client.put("/api", json={"prompts": ["a<|endoftext|>b"], "tokens_to_generate": 1})
    assert r.status_code == 200, r.text
    segments = r.json()["segments"][0]
    assert "<|endoftext|>" not in segments and "".join(segments).startswith("a<|endoftext|>b")
    chat = client.post("/v1/completions", json={"prompt": "<|endoftext|>", "max_tokens": 1, "logprobs": 0})
    assert chat.json()["usage"]["prompt_tokens"] > 1  # not one end-of-document token
