"""Memory stays flat while a real server answers requests of ever new shapes (uvicorn on 127.0.0.1).

Every prompt length times batch composition is a new input shape for the fp32 inference layout's
oneDNN kernels; before they were bounded, each new shape kept ~0.5 MB (a compiled kernel in
oneDNN's caches, and heap fragments glibc did not return).
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.generate.engine import Engine
from mtnlg.generate.quantize import onednn_linear_available, prepare_for_inference
from mtnlg.model.gpt import GPT
from mtnlg.serve.app import create_app
from tests.harness.serving import running

BOUND_MB = 40  # what 1,000 varied requests may add after the warm-up


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not onednn_linear_available(), reason="the fp32 layout is oneDNN's only where the build has it")
def test_a_thousand_varied_requests_stay_within_a_memory_bound() -> None:
    cfg = ModelConfig(vocab_size=512, seq_len=160, n_layers=2, hidden=64, n_heads=4, padded_vocab_multiple=64)
    torch.manual_seed(0)
    engine = Engine(prepare_for_inference(GPT(cfg), max_batch_size=8), max_batch_size=8)
    rng = random.Random(0)

    def body() -> dict:
        prompt = [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 140))]
        return {"prompt": prompt, "max_tokens": rng.randint(1, 6), "temperature": 0.8, "ignore_eos": True}

    with running(create_app(engine, batch_wait_s=0.002)) as url, httpx.Client(base_url=url, timeout=60) as client:
        def ask(_: int) -> int:
            return client.post("/v1/completions", json=body()).status_code

        with ThreadPoolExecutor(8) as pool:  # concurrent: varied batch compositions too
            assert set(pool.map(ask, range(300))) == {200}  # warm-up
            before = rss_mb()
            assert set(pool.map(ask, range(1000))) == {200}
            grown = rss_mb() - before
    assert grown < BOUND_MB, f"RSS grew by {grown:.0f} MB over 1,000 requests (bound {BOUND_MB} MB)"
