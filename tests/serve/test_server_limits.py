"""The server against bad, hostile and unlucky requests, through a real uvicorn server on 127.0.0.1:
one request never fails another, nothing non-finite or non-JSON reaches a client, limits are
checked before work is done, and auth covers everything but /health."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.serve.app import create_app
from mtnlg.serve.protocol import UNSUPPORTED
from tests.harness.serving import AUTH

BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def app_options() -> dict:
    return {"batch_wait_s": 0.3, "max_body_bytes": BODY_LIMIT}


def post(client: httpx.Client, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    return client.post("/v1/completions", json=body)


def test_a_bad_request_in_the_same_batch_does_not_fail_an_innocent_one(client: httpx.Client, engine: Engine) -> None:
    innocent = {"prompt": "The quick", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    bad = [{"prompt": "x", "max_tokens": 4, "top_k": 9223372036854775808},
           {"prompt": "x", "max_tokens": 4, "top_k": engine.vocab_size + 1},
           {"prompt": "x", "max_tokens": 4, "repetition_penalty": 1e-300}]
    with ThreadPoolExecutor(4) as pool:  # within one batching window
        answers = list(pool.map(lambda b: post(client, b), [innocent, *bad]))
    assert answers[0].status_code == 200
    expected = engine.generate(["The quick"], SamplingParams(max_new_tokens=6, temperature=0, ignore_eod=True))
    assert answers[0].json()["choices"][0]["text"] == expected[0].text
    for r, field in zip(answers[1:], ("top_k", "top_k", "repetition_penalty"), strict=True):
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("extreme", [{"top_p": 5e-324}, {"top_p": 1e-45, "temperature": 100},
                                     {"repetition_penalty": 0.01}, {"temperature": 1e-300},
                                     {"repetition_penalty": 1e-300}, {"repetition_penalty": 1e300}])
def test_nothing_non_finite_reaches_the_client(client: httpx.Client, engine: Engine, extreme: dict) -> None:
    """Strict JSON on both paths: a 200 with finite log-probs, or a 400 for settings out of range."""
    body = {"prompt": "The quick", "max_tokens": 6, "logprobs": 3, "seed": 3, "ignore_eos": True, **extreme}
    r = post(client, body)
    assert r.status_code in (200, 400), r.text
    out = json.loads(r.text, parse_constant=pytest.fail)  # NaN or Infinity would fail
    if r.status_code == 400:
        assert next(iter(extreme)) in out["error"]["message"]
        return
    assert all(math.isfinite(v) for v in out["choices"][0]["logprobs"]["token_logprobs"])
    if extreme.get("top_p", 1) < 1e-40:  # only the most likely token survives: greedy decoding
        greedy = engine.generate(["The quick"], SamplingParams(max_new_tokens=6, temperature=0, ignore_eod=True))
        assert out["choices"][0]["text"] == greedy[0].text
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line[6:], parse_constant=pytest.fail) for line in lines]
    assert chunks and all("error" not in c for c in chunks)


def test_lone_surrogates_get_a_json_400(client: httpx.Client) -> None:
    for raw in (b'{"prompt": "\\ud800", "max_tokens": 2}', b'{"prompt": ["ok", "\\udfff x"]}',
                b'{"prompt": "x", "stop": "\\ud800"}', b'{"\\ud800": 1}', b'{"prompt": "x", "user": "\\udc00"}'):
        r = post(client, raw)
        assert r.status_code == 400 and r.json()["error"]["message"], raw
    assert post(client, b'{"prompt": "\\ud83d\\ude00", "max_tokens": 2}').status_code == 200  # a valid pair


def test_each_refused_option_says_why(client: httpx.Client) -> None:
    values = {"echo": True, "suffix": "x", "best_of": 3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
              "logit_bias": {"50": 5}}
    messages = set()
    for name, value in values.items():
        r = post(client, {"prompt": "x", "max_tokens": 1, name: value})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == name and err["message"] == UNSUPPORTED[name]
        messages.add(err["message"])
    assert len(messages) == len(values)
    assert post(client, {"prompt": "x", "max_tokens": 1, "best_of": 2, "n": 2}).status_code == 200  # = n


def test_an_unknown_model_is_404_and_no_model_means_the_served_one(client: httpx.Client) -> None:
    r = post(client, {"model": "gpt-4", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for model in ({"model": "tiny"}, {"model": ""}, {}):
        assert post(client, {"prompt": "x", "max_tokens": 1, **model}).status_code == 200


def test_auth_covers_the_docs_and_comes_before_the_body(url: str) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
        assert httpx.get(f"{url}{path}").status_code == 401, path
    assert httpx.get(f"{url}/openapi.json", headers=AUTH).status_code == 200
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]  # no parser details
    assert httpx.get(f"{url}/health").status_code == 200
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="empty"):
            create_app(Engine.__new__(Engine), api_key=empty)


def test_counts_are_checked_before_tokenizing(client: httpx.Client, engine: Engine, monkeypatch) -> None:
    calls = []
    original = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text, specials=(): calls.append(text) or original(text))
    r = post(client, {"prompt": ["a b c"] * 10, "n": 16, "max_tokens": 1})
    assert r.status_code == 400 and "at most 64" in r.json()["error"]["message"] and not calls
    r = post(client, {"prompt": "The quick", "n": 4, "max_tokens": 1})
    assert r.status_code == 200 and calls == ["The quick"]  # once, not once per choice
    r = post(client, {"prompt": "z" * (BODY_LIMIT // 2), "max_tokens": 1})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    assert calls == ["The quick"]  # certainly too long: refused untokenized


def test_health_answers_while_a_huge_body_is_refused(url: str) -> None:
    huge = json.dumps({"prompt": "word " * 1_000_000}).encode()  # 5 MB
    result: dict = {}

    def send() -> None:
        result["r"] = httpx.post(f"{url}/v1/completions", content=huge, headers={**AUTH, "content-type":
                                 "application/json"}, timeout=60)

    sender = threading.Thread(target=send)
    sender.start()
    for _ in range(5):  # a liveness bound (the issue's), not a speed measurement
        assert httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    sender.join(60)
    r = result["r"]
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]


# -- fuzzing: no 5xx, always JSON --------------------------------------------------------------------

FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logprobs", "stream",
          "repetition_penalty", "ignore_eos", "model", "best_of", "echo", "stream_options", "logit_bias", "user"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 1, 2, 5, 64, 0.5, 1e-300, 1e300, 5e-324]),
    st.text(max_size=20), st.sampled_from(["\ud800", "a\udfffb", "\x00", "The quick"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5),
                                                                                           inner, max_size=3),
                      max_leaves=8)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values, max_size=6)
specials = st.sampled_from([b"NaN", b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
                            b"[" * 5000, b"\xff\xfe", b'{"prompt": "\\ud800"}', b"", b"null", b'"x"', b"{}"])


def _raw(body: dict) -> bytes:
    return json.dumps({"max_tokens": 2, **body}, ensure_ascii=True).encode()


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(bodies.map(_raw), specials))
def test_malformed_requests_never_get_a_5xx(client: httpx.Client, raw: bytes) -> None:
    r = post(client, raw)
    assert r.status_code < 500, (raw, r.status_code, r.text)
    if r.headers["content-type"].startswith("application/json"):
        out = json.loads(r.text, parse_constant=pytest.fail)  # strict JSON: no NaN/Infinity
        assert r.status_code == 200 or out["error"]["message"]
    else:
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                assert "error" not in json.loads(line[6:], parse_constant=pytest.fail), line
