"""The server over the block KV cache (prefix caching, chunked prefill, a pool small enough to run
out): concurrent clients get the contiguous engine's greedy text, and the pool's metrics."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.model.paged_cache import block_bytes
from tests.harness.serving import AUTH, tiny_engine

SYSTEM = "You are brief and kind. "
PROMPTS = [SYSTEM + q for q in ("The quick", "Pack my box", "jumps over", "lazy dog", "five dozen liquor",
                                "brown fox", "How vexingly quick daft zebras jump", "a")] + ["x", "The five boxing"]


@pytest.fixture(scope="module")
def reference(engine_tokenizer: Tokenizer) -> Engine:
    return tiny_engine(engine_tokenizer)


@pytest.fixture(scope="module")
def engine(reference: Engine) -> Engine:
    """The same weights over a pool of 24 blocks of 4 positions: fewer than 8 rows of these prompts need."""
    model = reference.model
    return Engine(model, reference.tokenizer, max_batch_size=8, kv_cache="paged", block_size=4, prefill_chunk=8,
                  kv_cache_bytes=25 * block_bytes(model, 4))


@pytest.fixture(scope="module")
def app_options() -> dict:
    return {"batch_wait_s": 0.05}


def test_concurrent_clients_get_the_contiguous_engines_text(url: str, client: httpx.Client, reference: Engine,
                                                            engine: Engine) -> None:
    def ask(prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(ask, PROMPTS))
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eod=True)
    assert texts == [c.text for c in reference.generate(PROMPTS, greedy)]
    metrics = client.get("/metrics").text
    value = {name: float(re.search(rf"^{name} (\S+)$", metrics, re.M).group(1)) for name in (
        "mtnlg_kv_cache_preemptions", "mtnlg_prefix_cache_hit_rate", "mtnlg_kv_cache_blocks",
        "mtnlg_kv_cache_blocks_in_use")}
    assert value["mtnlg_kv_cache_blocks"] == 24 and value["mtnlg_kv_cache_blocks_in_use"] == 0
    assert value["mtnlg_kv_cache_preemptions"] > 0  # the pool ran out, and every request still finished
    assert value["mtnlg_prefix_cache_hit_rate"] > 0.2  # the system prompt's blocks were shared
