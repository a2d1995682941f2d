"""The HTTP server through real clients (httpx, openai) against uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mtnlg.checkpoint.model import save_model
from mtnlg.config import Config, ModelConfig
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.model.gpt import GPT
from mtnlg.serve.app import create_app
from tests.harness.serving import AUTH, KEY, free_port, running, wait_healthy

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")



@pytest.fixture(scope="module")
def app_options() -> dict:
    return {"batch_wait_s": 0.2}  # a generous batching window: concurrent requests reliably share batches


def reference(engine: Engine, prompt: str, **kw) -> str:
    return engine.generate([prompt], SamplingParams(**kw))[0].text


def test_health_and_models(url: str, client: httpx.Client) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # no key needed
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"


def test_completion_equals_the_engine(client: httpx.Client, engine: Engine) -> None:
    body = {"model": "tiny", "prompt": ["The quick", "Pack my"], "max_tokens": 7, "temperature": 0, "n": 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "text_completion"
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert texts == [reference(engine, p, max_new_tokens=7, temperature=0) for p in body["prompt"]]
    usage = out["usage"]
    assert usage["completion_tokens"] <= 14
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_n_choices_are_seeded_samples(client: httpx.Client, engine: Engine) -> None:
    body = {"prompt": "The quick", "max_tokens": 6, "n": 3, "seed": 10, "temperature": 1.0, "ignore_eos": True}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    expected = [reference(engine, "The quick", max_new_tokens=6, seed=10 + j, ignore_eod=True) for j in range(3)]
    assert [c["text"] for c in choices] == expected
    assert client.post("/v1/completions", json=body).json()["choices"] == choices


def test_streaming_server_sent_events(client: httpx.Client, engine: Engine) -> None:
    body = {"prompt": "Pack my box", "max_tokens": 8, "temperature": 0, "stream": True, "logprobs": 1,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == reference(engine, "Pack my box", max_new_tokens=8, temperature=0)
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    logprobs = [c["choices"][0]["logprobs"] for c in chunks[:-1] if c["choices"][0]["logprobs"]]
    assert logprobs and all(lp["token_logprobs"][0] <= 0 for lp in logprobs)


def test_stop_and_logprobs(client: httpx.Client, engine: Engine) -> None:
    free = reference(engine, "The quick", max_new_tokens=10, temperature=0, ignore_eod=True)
    stop = free[4:6]
    body = {"prompt": "The quick", "max_tokens": 10, "temperature": 0, "stop": stop, "ignore_eos": True, "logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == free[: free.index(stop)] and choice["finish_reason"] == "stop"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) >= 1
    assert all(len(t) <= 2 for t in lp["top_logprobs"])


def test_megatron_api(client: httpx.Client, engine: Engine) -> None:
    body = {"prompts": ["The quick", "Pack"], "tokens_to_generate": 5, "top_k": 1, "logprobs": True}
    out = client.put("/api", json=body).json()
    for prompt, text, logprobs in zip(body["prompts"], out["text"], out["logprobs"], strict=True):
        assert text == prompt + reference(engine, prompt, max_new_tokens=5, temperature=0)
        assert len(logprobs) <= 5
    both = client.put("/api", json={"prompts": ["x"], "top_k": 2, "top_p": 0.5})
    assert both.status_code == 400 and "both" in both.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "body"),
        (json.dumps({"prompt": "x", "max_tokens": -3}), "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": 10**9}), "context length"),
        (json.dumps({"prompt": "x", "max_tokens": "ten"}), "max_tokens"),
        (json.dumps({"prompt": "x", "temperature": [1]}), "temperature"),
        (json.dumps({"prompt": "x " * 80, "max_tokens": 4}), "context length"),
        (json.dumps({"prompt": "x", "max_tokenz": 4}), "max_tokenz"),
        (json.dumps({"prompt": "x", "echo": True}), "echo"),
    ],
)
def test_bad_requests_get_400_and_the_server_keeps_serving(client: httpx.Client, content, fragment: str) -> None:
    r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert fragment in r.json()["error"]["message"]
    ok = client.post("/v1/completions", json={"prompt": "The", "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_api_key_is_required(url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.put(f"{url}/api", json={"prompts": ["x"]}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt="x", max_tokens=1
        )


def test_official_openai_client(url: str, engine: Engine) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="The quick", max_tokens=6, temperature=0)
    expected = reference(engine, "The quick", max_new_tokens=6, temperature=0)
    assert done.choices[0].text == expected and done.usage.completion_tokens >= 1
    stream = client.completions.create(model="tiny", prompt="The quick", max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected


def test_concurrent_requests_share_batches(url: str, client: httpx.Client, engine: Engine) -> None:
    prompts = ["The quick", "Pack my box", "jumps", "lazy dog", "five dozen", "brown"]
    before = client.get("/health").json()

    def ask(prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        return httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60).json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(ask, prompts))
    after = client.get("/health").json()
    assert after["largest_batch"] > 1
    assert after["batches"] - before["batches"] < len(prompts)  # fewer batches than requests
    assert texts == [reference(engine, p, max_new_tokens=12, temperature=0, ignore_eod=True) for p in prompts]


def test_mtnlg_serve_command(tmp_path: Path, small_tokenizer) -> None:
    cfg = Config(model=ModelConfig(vocab_size=small_tokenizer.vocab_size, seq_len=32, n_layers=1, hidden=32,
                                   n_heads=2, padded_vocab_multiple=64))
    ckpt = save_model(tmp_path / "ckpt", GPT(cfg.model), cfg, small_tokenizer)
    port = free_port()
    env = {**os.environ, "MTNLG_API_KEY": "k2"}
    cmd = [sys.executable, "-m", "mtnlg", "serve", "--checkpoint", str(ckpt), "--port", str(port), "--quantize", "int8",
           "--kv-cache-bytes", "65536", "--prefill-chunk", "4", "--no-prefix-cache"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base, timeout=180)
        body = {"prompt": "The", "max_tokens": 3}
        assert httpx.post(f"{base}/v1/completions", json=body).status_code == 401
        r = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer k2"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "ckpt"
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer k2"}).text
        assert "mtnlg_kv_cache_blocks 15.0" in metrics  # 65536 bytes / (2 x 16 x 32 x 4 bytes), less the scratch block
    finally:
        proc.terminate()
        proc.wait(15)


def test_requests_join_a_running_batch(url: str, client: httpx.Client, engine: Engine) -> None:
    before = client.get("/health").json()["admitted"]
    long_body = {"prompt": "Pack my box with five dozen", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                 "stream": True}
    bodies = [{"prompt": p, "max_tokens": 5, "temperature": 0, "ignore_eos": True} for p in ("The", "lazy")]
    slow = engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.05))  # 40 steps take >= 2 s
    try:
        with client.stream("POST", "/v1/completions", json=long_body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # the long request is decoding now
            with ThreadPoolExecutor(len(bodies)) as pool:
                answers = list(pool.map(lambda b: client.post("/v1/completions", json=b).json(), bodies))
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    finally:
        slow.remove()
    assert client.get("/health").json()["admitted"] > before
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    expected = [reference(engine, b["prompt"], max_new_tokens=5, temperature=0, ignore_eod=True) for b in bodies]
    assert [a["choices"][0]["text"] for a in answers] == expected


def test_app_from_a_checkpoint_directory(tmp_path: Path, small_tokenizer) -> None:
    cfg = Config(model=ModelConfig(vocab_size=small_tokenizer.vocab_size, seq_len=32, n_layers=1, hidden=32,
                                   n_heads=2, padded_vocab_multiple=64))
    model = GPT(cfg.model)
    ckpt = save_model(tmp_path / "my-model", model, cfg, small_tokenizer)
    expected = Engine(model, small_tokenizer).generate(["The"], SamplingParams(max_new_tokens=4, temperature=0))
    with running(create_app(ckpt)) as base:
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "my-model"
        out = httpx.post(f"{base}/v1/completions", json={"prompt": "The", "max_tokens": 4, "temperature": 0}).json()
    assert out["choices"][0]["text"] == expected[0].text


@pytest.mark.parametrize("stream", [True, False])
def test_jobs_hand_tokens_to_the_event_loop_per_token_only_when_streaming(stream: bool) -> None:
    """Every hand-over wakes the event loop's thread, which competes with the model for the cores."""
    import asyncio

    from mtnlg.generate.sequence import TokenEvent
    from mtnlg.serve.batcher import Job

    async def run() -> list:
        job = Job([], asyncio.get_running_loop(), stream=stream)
        events = [TokenEvent(0, 5, "a"), TokenEvent(1, 6, "b"), TokenEvent(0, 7, "c", finish_reason="length")]
        for e in events:
            job.deliver((e.index, e))
        await asyncio.sleep(0)  # let the scheduled hand-overs run
        return [job.events.get_nowait() for _ in range(job.events.qsize())]

    handed = asyncio.run(run())
    assert [len(items) for items in handed] == ([1, 1, 1] if stream else [3])
    assert [e.text for items in handed for _, e in items] == ["a", "b", "c"]
