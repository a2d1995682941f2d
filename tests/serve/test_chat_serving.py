"""Chat completions (the official openai client against uvicorn), /metrics, the access log, the
playground page's route, and `mtnlg chat` with piped input."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import torch

from mtnlg.checkpoint.model import save_model
from mtnlg.cli import main
from mtnlg.config import Config, ModelConfig
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.model.gpt import GPT
from mtnlg.serve.app import PLAYGROUND, create_app
from tests.harness.serving import KEY, with_chat_markers

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

TEMPLATE = ChatTemplate()
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pack my box"}]


@pytest.fixture(scope="module")
def engine_tokenizer(small_tokenizer: Tokenizer) -> Tokenizer:
    return with_chat_markers(small_tokenizer)


def reference(engine: Engine, messages: list[dict], **kw):
    """What the engine itself answers to the rendered conversation, ending at the end marker."""
    prompt = engine.encode(TEMPLATE.render(messages), specials=TEMPLATE.markers)
    return engine.generate([prompt], SamplingParams(stop=[TEMPLATE.end], **kw))[0]


def test_official_client_chat_plain_and_streamed(url: str, engine: Engine, engine_tokenizer: Tokenizer) -> None:
    api = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    done = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    expected = reference(engine, MESSAGES, max_new_tokens=8, temperature=0)
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected.text and done.choices[0].finish_reason == expected.finish_reason
    prompt_tokens = len(engine_tokenizer.encode(TEMPLATE.render(MESSAGES), specials=TEMPLATE.markers))
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_tokens, len(expected.tokens))
    assert done.usage.total_tokens == prompt_tokens + len(expected.tokens)

    chunks = list(api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.tokens) and not chunks[-1].choices


def test_seeded_choices_and_the_rest_of_the_context(client: httpx.Client, engine: Engine) -> None:
    body = {"messages": MESSAGES, "max_completion_tokens": 6, "n": 2, "seed": 7, "ignore_eos": True}
    choices = client.post("/v1/chat/completions", json=body).json()["choices"]
    expected = [reference(engine, MESSAGES, max_new_tokens=6, seed=7 + j, ignore_eod=True).text for j in range(2)]
    assert [c["message"]["content"] for c in choices] == expected
    # Without a limit the answer may fill the context, and no more.
    out = client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "ignore_eos": True}).json()
    room = engine.seq_len - out["usage"]["prompt_tokens"]
    assert out["usage"]["completion_tokens"] == room or out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"] == reference(engine, MESSAGES, max_new_tokens=room,
                                                                temperature=0, ignore_eod=True).text


def test_the_answer_ends_at_the_end_marker(client: httpx.Client, engine: Engine, engine_tokenizer: Tokenizer) -> None:
    end_id = engine_tokenizer.hf.token_to_id(TEMPLATE.end)

    def prefer_end(_module, _inputs, logits: torch.Tensor) -> torch.Tensor:
        logits[..., end_id] = 1e4
        return logits

    hook = engine.model.register_forward_hook(prefer_end)
    try:
        out = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8}).json()
    finally:
        hook.remove()
    assert out["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": "stop"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "a <|end|> b"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
         "messages.0.content.0.type"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d"]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, "max_tokens"),  # alone too many
        ({"messages": [{"role": "user", "content": "x " * 200}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "functions": []}, "functions"),
    ],
)
def test_bad_chat_requests_get_400_naming_the_field(client: httpx.Client, body: dict, param: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0].split("[")[0] in error["message"]


def _samples(text: str) -> dict[tuple, float]:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def _eventually(read: Callable[[], object], done: Callable[[object], bool], timeout: float = 10.0) -> object:
    """``read()`` until ``done`` with it: a request is counted and logged just after its last byte is
    sent, so a client can see the answer a moment before that."""
    deadline = time.monotonic() + timeout
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_metrics_move_with_requests(url: str, client: httpx.Client) -> None:
    assert httpx.get(f"{url}/metrics").status_code == 401  # behind the key, like the API
    before = _samples(client.get("/metrics").text)
    out = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, "ignore_eos": True}).json()
    client.post("/v1/chat/completions", json={"messages": []})

    def moved(after: dict, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    chat_requests = ("mtnlg_requests_total", "/v1/chat/completions")
    after = _eventually(lambda: _samples(client.get("/metrics").text),
                        lambda a: moved(a, *chat_requests[:1], endpoint=chat_requests[1], status="400") == 1)
    assert moved(after, "mtnlg_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert moved(after, "mtnlg_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert moved(after, "mtnlg_requests_total", endpoint="/metrics", status="200") >= 1  # the scrapes
    assert moved(after, "mtnlg_generated_tokens_total") == out["usage"]["completion_tokens"] == 5
    assert moved(after, "mtnlg_time_to_first_token_seconds_count") == 1
    assert moved(after, "mtnlg_time_per_output_token_seconds_count") == 4
    assert moved(after, "mtnlg_batch_size_count") >= 4 and moved(after, "mtnlg_batch_size_sum") >= 4
    assert moved(after, "mtnlg_request_duration_seconds_count", endpoint="/v1/chat/completions") == 2
    assert after[("mtnlg_queue_depth", ())] == 0 and after[("mtnlg_running_sequences", ())] == 0


def test_apps_keep_separate_metrics(engine: Engine) -> None:
    first, second = create_app(engine), create_app(engine)
    first.state.metrics.requests.labels("/health", "200").inc()
    counted = [_samples(app.state.metrics.response().body.decode()) for app in (first, second)]
    key = ("mtnlg_requests_total", (("endpoint", "/health"), ("status", "200")))
    assert counted[0][key] == 1 and key not in counted[1]


def test_access_log_is_one_json_line_per_request(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtnlg.access")
    out = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "stream": True})
    assert out.status_code == 200
    client.get("/nowhere")
    records = _eventually(lambda: [r for r in caplog.records if r.name == "mtnlg.access"], lambda r: len(r) >= 2)
    chat, missing = [json.loads(r.getMessage()) for r in records]
    assert chat["method"] == "POST" and chat["path"] == "/v1/chat/completions" and chat["status"] == 200
    assert 1 <= chat["tokens"] <= 3 and chat["duration_s"] > 0 and chat["client"] == "127.0.0.1"
    assert (missing["path"], missing["status"], missing["tokens"]) == ("/nowhere", 404, 0)


def test_playground_page_is_public_and_self_contained(url: str) -> None:
    page = httpx.get(f"{url}/")  # no key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="api-key"' in html and "/v1/chat/completions" in html and "Authorization" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page fetches nothing external"
    assert not re.search(r"""(url|import)\s*\(\s*["']?(https?:)?//""", html)


def test_the_page_ships_in_the_package() -> None:
    """setuptools only packs the page as package data: the wheel would serve a 500 without it."""
    root = Path(__file__).resolve().parents[2]
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    page = PLAYGROUND.relative_to(root / "mtnlg" / "serve").as_posix()
    assert any(fnmatch(page, pattern) for pattern in globs["mtnlg.serve"]) and PLAYGROUND.is_file()


def test_mtnlg_chat_with_piped_stdin(tmp_path, engine_tokenizer: Tokenizer, monkeypatch, capsys) -> None:
    cfg = Config(model=ModelConfig(vocab_size=engine_tokenizer.vocab_size, seq_len=48, n_layers=1, hidden=32,
                                   n_heads=2, padded_vocab_multiple=64, init_std=0.3))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    ckpt = save_model(tmp_path / "ckpt", model, cfg, engine_tokenizer)
    messages = ["Pack my box", "/reset", "Pack my box", "The quick", "brown fox", "jumps over", "/exit", "never"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(messages) + "\n"))
    answered = []
    run = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self, requests: answered.append(requests) or run(self, requests))
    args = ["chat", "--checkpoint", str(ckpt), "--system", "Be brief.", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args) == 0
    out, answers = capsys.readouterr().out, len(answered)
    first = reference(Engine(model, engine_tokenizer), [MESSAGES[0], {"role": "user", "content": "Pack my box"}],
                      max_new_tokens=6, temperature=0).text
    assert out.startswith(f"{first}\n(conversation cleared)\n{first}\n")  # /reset forgot the first exchange
    assert answers == 5 and not re.search("^error:", out, re.M)  # nothing after /exit; the oldest exchanges made room


def test_chat_drops_the_oldest_exchanges_to_fit(engine: Engine) -> None:
    from mtnlg.generate.console import chat

    lines = ["The quick brown fox", "jumps over the lazy dog", "Pack my box", "with five dozen", "liquor jugs"]
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eod=True)
    kept = chat(engine, params, lines, system="Be brief.", out=io.StringIO())
    assert kept[0] == {"role": "system", "content": "Be brief."} and kept[-2]["content"] == "liquor jugs"
    assert kept[-1]["role"] == "assistant" and len(kept) < 1 + 2 * len(lines)  # 64 tokens hold fewer exchanges
    assert len(engine.encode(TEMPLATE.render(kept[:-1]), specials=TEMPLATE.markers)) + 8 <= engine.seq_len
