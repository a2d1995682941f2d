"""``torchrun --nproc_per_node=2 -m mtnlg serve --tp 2`` through the official openai client against
one process; then a rank is killed, and the server ends with one line saying which, never a hang.

One server serves both parts (two ranks start in tens of seconds on 2 busy cores).
"""

from __future__ import annotations

import contextlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint.model import save_model
from mtnlg.config import Config, ModelConfig
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.model.gpt import GPT
from tests.harness.cli import finish, rank_pid, start_torchrun
from tests.harness.serving import KEY, free_port, wait_healthy

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPTS = ["The quick", "Pack my box with five", "lazy"]  # different lengths: padded rows in one batch


def test_tp2_server_answers_like_one_process_and_ends_when_a_rank_dies(tmp_path: Path, small_tokenizer) -> None:
    cfg = Config(model=ModelConfig(vocab_size=small_tokenizer.vocab_size, seq_len=64, n_layers=2, hidden=64,
                                   n_heads=4, padded_vocab_multiple=64, init_std=0.3))
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "tiny", GPT(cfg.model), cfg, small_tokenizer)
    port = free_port()
    proc = start_torchrun(["serve", "--checkpoint", str(ckpt), "--tp", "2", "--port", str(port), "--api-key", KEY,
                           "--rank-timeout", "30"])
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base, timeout=120)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=180)

        def ask(prompt: str) -> str:
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: continuous batching on both ranks
            texts = list(pool.map(ask, PROMPTS))
        sampled = client.completions.create(model="tiny", prompt="The", max_tokens=6, temperature=1.0, seed=3)
        assert httpx.get(f"{base}/v1/models").status_code == 401  # the same limits as one process
        assert "mtnlg_" in httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        inspected = httpx.post(f"{base}/v1/inspect", json={"prompt": "The"}, headers={"Authorization": f"Bearer {KEY}"})
        assert inspected.status_code == 501 and "without --tp" in inspected.json()["error"]["message"]

        one = Engine.from_checkpoint(ckpt)
        greedy = SamplingParams(max_new_tokens=6, temperature=0)
        assert texts == [c.text for c in one.generate(PROMPTS, greedy)]
        expected = one.generate(["The"], SamplingParams(max_new_tokens=6, temperature=1.0, seed=3))[0].text
        assert sampled.choices[0].text == expected

        follower = rank_pid(proc, 1)
        assert follower is not None
        os.kill(follower, signal.SIGKILL)
        out = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:  # torchrun's workers are not in its process group: killed one by one
            workers = [pid for rank in (0, 1) if (pid := rank_pid(proc, rank)) is not None]
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "mtnlg serve: rank 1 of 2 is gone" in out, out[-3000:]
