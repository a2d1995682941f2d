"""The block (paged) KV cache against the contiguous one: the same tokens with each feature on and off; the
scheduler's prefill order."""

from __future__ import annotations

import random

import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.generate.engine import Completion, Engine, Request, SamplingParams
from mtnlg.generate.paged import PagedDecoder
from mtnlg.generate.scheduler import BlockPool, Scheduler
from mtnlg.model.gpt import GPT
from mtnlg.model.paged_cache import BlockStorage, DecodeFrame, block_bytes

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eod=True)
SAMPLED = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=3, ignore_eod=True,
                         repetition_penalty=1.3)


@pytest.fixture(scope="module")
def model() -> GPT:
    cfg = ModelConfig(vocab_size=200, seq_len=64, n_layers=2, hidden=64, n_heads=4, n_kv_heads=2,
                      padded_vocab_multiple=64, init_std=0.3)
    torch.manual_seed(0)
    return GPT(cfg).eval()


def mixed_prompts(n: int = 10, seed: int = 0) -> list[list[int]]:
    """Prompts of mixed lengths, most starting with one shared 20-token "system prompt"."""
    rng = random.Random(seed)
    system = [rng.randrange(200) for _ in range(20)]
    prompts = [system + [rng.randrange(200) for _ in range(rng.randrange(1, 30))] for _ in range(n - 3)]
    return prompts + [[5], [7, 8], [rng.randrange(200) for _ in range(40)]]


def staggered(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Run ``prompts`` through one decoder, adding one (or two) between steps while they fit."""
    decoder, pending, order, out, steps = engine.decoder(), [engine.request(p, params) for p in prompts], [], {}, 0
    while pending or len(decoder):
        while pending and decoder.can_add(pending[:1]):
            order += decoder.add([pending.pop(0)])[0]
            if steps % 2:
                break
        for event in decoder.step():
            assert event.finish_reason != "error", event.error
            if event.token is not None:
                out.setdefault(event.index, []).append(event.token)
        steps += 1
        assert steps < 3000, "the decoder does not make progress"
    return [out[i] for i in order]


@pytest.mark.parametrize(("options", "sampled"), [
    ({}, True), ({"prefix_cache": False}, False), ({"block_size": 4, "prefill_chunk": 7}, True),
], ids=["paged", "no-prefix-cache", "chunked-small-blocks"])
def test_paged_decoding_equals_the_contiguous_cache(model: GPT, options: dict, sampled: bool) -> None:
    prompts = mixed_prompts()
    reference = Engine(model, None, max_batch_size=6)
    paged = Engine(model, None, max_batch_size=6, kv_cache="paged", **options)
    assert isinstance(paged.decoder(), PagedDecoder)
    for params in (GREEDY, SAMPLED) if sampled else (GREEDY,):
        want = [c.tokens for c in reference.generate(prompts, params)]
        assert staggered(paged, prompts, params) == want
    stats = paged.kv_stats()
    assert stats["blocks_in_use"] == 0  # every finished sequence gave its blocks back
    assert (stats["prefix_hit_rate"] > 0.2) == options.get("prefix_cache", True)


def test_decode_steps_gather_each_row_once(model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    gathered = []
    plan = DecodeFrame.plan
    monkeypatch.setattr(DecodeFrame, "plan", lambda self, moves, trim, join, width: (
        gathered.append(0 if join is None else join.shape[0]), plan(self, moves, trim, join, width))[1])
    engine = Engine(model, None, max_batch_size=4, kv_cache="paged", block_size=4)
    prompts = mixed_prompts()[:4]
    got = [c.tokens for c in engine.generate(prompts, GREEDY)]
    assert got == [c.tokens for c in Engine(model, None, max_batch_size=4).generate(prompts, GREEDY)]
    assert len(gathered) == GREEDY.max_new_tokens and sum(gathered) == 4  # joined once, then appended to


def test_an_exhausted_pool_preempts_and_every_sequence_finishes(model: GPT) -> None:
    per_block = block_bytes(model, 4)
    small = Engine(model, None, max_batch_size=8, kv_cache="paged", block_size=4, kv_cache_bytes=30 * per_block)
    prompts = mixed_prompts(seed=1)
    want = [c.tokens for c in Engine(model, None, max_batch_size=8).generate(prompts, GREEDY)]
    assert staggered(small, prompts, GREEDY) == want
    assert small.kv_stats()["preemptions"] > 0 and small.kv_stats()["blocks_total"] == 29
    with pytest.raises(ValueError, match="--kv-cache-bytes 100 holds 0 blocks"):
        Engine(model, None, kv_cache="paged", kv_cache_bytes=100)


def test_a_shared_prefix_is_prefilled_once_and_evicted_last_used_first(model: GPT) -> None:
    engine = Engine(model, None, max_batch_size=4, kv_cache="paged", block_size=4,
                    kv_cache_bytes=24 * block_bytes(model, 4))
    pool, system = engine.pool, list(range(10, 30))  # 5 full blocks
    decoder = engine.decoder()
    decoder.add([engine.request(system + [1, 2], GREEDY), engine.request(system + [3], GREEDY)])
    decoder.step()
    first, second = decoder.scheduler.running
    assert first.table.blocks[:5] == second.table.blocks[:5]  # shared read-only
    assert all(pool.refs[b] == 2 for b in first.table.blocks[:5])
    assert pool.stats["hit_tokens"] == 20
    while len(decoder):
        decoder.step()
    assert pool.in_use() == 0 and len(pool.lru) >= 5
    old = [pool.key_of[b] for b in pool.lru]  # least recently used first
    others = engine.decoder()  # an unrelated prompt needs most blocks: the least recently used go first
    others.add([engine.request(list(range(100, 150)), GREEDY)])
    while len(others):
        others.step()
    gone = [key for key in old if key not in pool.by_hash]
    assert gone and gone == old[: len(gone)]


def test_rollback_forgets_positions_and_decoding_resumes_from_them(model: GPT) -> None:
    engine = Engine(model, None, max_batch_size=2, kv_cache="paged", block_size=4)
    prompt, params = list(range(3, 14)), SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eod=True)
    want = engine.generate([prompt], params)[0].tokens
    decoder = engine.decoder()
    (index,), _ = decoder.add([engine.request(prompt, params)])
    twin, _ = decoder.add([engine.request(prompt, params)])  # shares the blocks of the prompt
    got = [[e.token for e in decoder.step()][0] for _ in range(9)]
    seq = decoder.scheduler.running[0]
    decoder.rollback(index, len(prompt) + 2)  # keep 2 generated tokens: cut inside a block shared with the twin
    assert seq.table.cached == len(prompt) + 1 and len(seq.tokens) == len(prompt) + 2
    assert not set(seq.table.blocks[-1:]) & set(decoder.scheduler.running[1].table.blocks)  # copied on write
    seq.item.row.n_generated = 2
    got = got[:2]
    while len(decoder):
        got += [e.token for e in decoder.step() if e.index == index and e.token is not None]
    assert got == want


def test_a_request_that_cannot_be_sampled_fails_alone(model: GPT) -> None:
    engine = Engine(model, None, max_batch_size=4, kv_cache="paged")
    good = [engine.request(p, GREEDY) for p in mixed_prompts()[:2]]
    broken = Request([1, 2, 3], SamplingParams(max_new_tokens=5, top_k=2**63))  # no validated request has it
    results: dict[int, Completion] = {}
    for event in engine.run([good[0], broken, good[1]]):
        results.setdefault(event.index, Completion([])).add(event)
    assert results[1].finish_reason == "error" and "overflow" in results[1].error.lower()
    assert [results[0].tokens, results[2].tokens] == [c.tokens for c in Engine(model, None).generate(
        [r.prompt for r in good], GREEDY)]


@pytest.mark.parametrize("max_wait", [3, 10**9], ids=["aging", "no-aging"])
def test_a_long_prompt_is_not_starved_by_a_stream_of_short_ones(max_wait: int) -> None:
    pool = BlockPool(BlockStorage(1, 64, 4), prefix_cache=False)
    sched: Scheduler[str] = Scheduler(pool, max_rows=8, prefill_chunk=8, max_prefill_wait=max_wait)
    sched.add("long", list(range(41)))  # 40 positions to prefill: 5 steps of the whole budget
    first_work, prefilled_at = None, None
    for step in range(12):
        sched.add(f"short{step}", [100 + step] * 9)  # 8 to prefill: the whole budget, and shorter
        sched.admit()
        done, budget = set(), 8
        while budget and (work := sched.next_prefill(budget, done)) is not None:
            seq, n = work
            seq.table.commit(pool, seq.tokens, n)
            budget -= n
            if seq.item == "long":
                first_work = step if first_work is None else first_work
                prefilled_at = step if seq.to_prefill == 0 else None
        sched.age(done)
        for seq in [s for s in sched.running if s.to_prefill == 0]:  # prefilled: decodes once and leaves
            sched.finish(seq)
    if max_wait == 3:  # starved in steps 0-2, then first (before the newer short prompts) until prefilled
        assert (first_work, prefilled_at) == (3, 7)
    else:
        assert first_work is None  # shortest first alone: never a token for the long prompt
