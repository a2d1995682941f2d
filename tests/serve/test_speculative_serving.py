"""Speculative decoding through a real server: concurrent greedy clients get the text decoding
without speculation gives, and /metrics reports the acceptance rate."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.generate.speculative import make_speculation
from tests.harness.serving import AUTH, tiny_engine

PROMPTS = ["The quick brown fox. The quick brown", "Pack my box", "jumps over the lazy dog. jumps over",
           "five dozen liquor jugs. Pack my box with five dozen", "a", "The lazy dog"]


@pytest.fixture(scope="module")
def plain(engine_tokenizer: Tokenizer) -> Engine:
    return tiny_engine(engine_tokenizer)


@pytest.fixture(scope="module")
def engine(plain: Engine) -> Engine:
    """The same model, with n-gram speculation."""
    return Engine(plain.model, plain.tokenizer, plain.max_batch_size, speculation=make_speculation("ngram", 4))


@pytest.fixture(scope="module")
def app_options() -> dict:
    return {"batch_wait_s": 0.05}


def test_concurrent_greedy_clients_get_the_text_without_speculation(url: str, engine: Engine, plain: Engine) -> None:
    def ask(prompt: str, stream: bool = False) -> str:
        body = {"prompt": prompt, "max_tokens": 6 + len(prompt) % 13, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
            if not stream:
                return c.post("/v1/completions", json=body).json()["choices"][0]["text"]
            with c.stream("POST", "/v1/completions", json=body) as r:
                import json

                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            return "".join(e["choices"][0]["text"] for e in events)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(ask, PROMPTS, [i % 2 == 1 for i in range(len(PROMPTS))]))
    expected = [plain.generate([p], SamplingParams(max_new_tokens=6 + len(p) % 13, temperature=0,
                                                   ignore_eod=True))[0].text for p in PROMPTS]
    assert texts == expected
    assert engine.speculation.counts["proposed"] > 0
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    proposed = next(line for line in metrics.splitlines() if line.startswith("mtnlg_speculative_proposed_tokens_total"))
    assert float(proposed.split()[-1]) == engine.speculation.counts["proposed"]
    assert "mtnlg_speculative_acceptance_rate " in metrics
