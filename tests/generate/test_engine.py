"""The generation engine against recompute-from-scratch decoding with the plain model."""

from __future__ import annotations

import copy

import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.generate.engine import Completion, Engine, Request, SamplingParams
from mtnlg.model.gpt import GPT

PROMPTS = ["The quick brown", "Pack my box with five dozen", "a", "jumps over the lazy dog. The"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eod=True)


@pytest.fixture(scope="module")
def engine(small_tokenizer) -> Engine:
    # A large init std gives a random model varied, non-repeating output (a small one copies its input).
    cfg = ModelConfig(
        vocab_size=small_tokenizer.vocab_size, seq_len=64, n_layers=2, hidden=64, n_heads=4,
        padded_vocab_multiple=64, init_std=0.3,
    )
    torch.manual_seed(0)
    return Engine(GPT(cfg), small_tokenizer, max_batch_size=4)


def recompute_greedy(model: GPT, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by running the whole sequence through the model at every step (no cache)."""
    ids, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1, : model.cfg.vocab_size]
            logps.append(logits.log_softmax(-1))
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :], logps


def test_kv_cache_greedy_equals_recompute_from_scratch(engine: Engine) -> None:
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        [out] = engine.generate([prompt], GREEDY)
        expected, _ = recompute_greedy(engine.model, ids, GREEDY.max_new_tokens)
        assert out.tokens == expected
        assert len(set(expected)) > 3  # the test model does not just repeat itself
        assert out.text == engine.tokenizer.decode(expected)


def test_batched_generation_equals_one_by_one(engine: Engine) -> None:
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11, ignore_eod=True)
    for params in (GREEDY, sampled):
        batched = engine.generate(PROMPTS, params)
        alone = [engine.generate([p], params)[0] for p in PROMPTS]
        assert [c.tokens for c in batched] == [c.tokens for c in alone]


def test_mixed_settings_in_one_batch(engine: Engine) -> None:
    params = [
        SamplingParams(max_new_tokens=3, temperature=0.0),
        SamplingParams(max_new_tokens=9, temperature=1.0, top_k=5, seed=1),
        SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.8, seed=2, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=0),
    ]
    batched = engine.generate(PROMPTS, params)
    alone = [engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, params, strict=True)]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert [len(c.tokens) for c in batched] == [3, 9, 6, 0]


def test_padded_vocabulary_is_never_sampled(small_tokenizer) -> None:
    cfg = ModelConfig(vocab_size=small_tokenizer.vocab_size, seq_len=32, n_layers=1, hidden=32, n_heads=2,
                      padded_vocab_multiple=256)
    model = GPT(cfg)
    with torch.no_grad():  # make every padding row the most likely "token" by far
        model.wte.weight[cfg.vocab_size :] = 0
        model.ln_f.bias.fill_(1.0)
        model.ln_f.weight.zero_()
        model.wte.weight[cfg.vocab_size :] = 10.0
    assert int(model(torch.tensor([[1, 2]]))[0, -1].argmax()) >= cfg.vocab_size
    engine = Engine(model, small_tokenizer)
    for params in (GREEDY, SamplingParams(max_new_tokens=20, temperature=5.0, seed=0, ignore_eod=True)):
        [out] = engine.generate(["The"], params)
        assert out.tokens and max(out.tokens) < cfg.vocab_size


def test_stop_strings_end_the_text_before_them(engine: Engine) -> None:
    [free] = engine.generate([PROMPTS[0]], GREEDY)
    stop = free.text[5:8]  # some text in the middle of the unconstrained output
    cut = free.text.index(stop)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop=["\x00never", stop], ignore_eod=True)
    [out] = engine.generate([PROMPTS[0]], params)
    assert out.text == free.text[:cut]
    assert out.finish_reason == "stop"
    streamed = "".join(e.text for e in engine.stream(PROMPTS[0], params))
    assert streamed == out.text


def test_end_of_document_stops_unless_ignored(engine: Engine) -> None:
    [free] = engine.generate([PROMPTS[1]], GREEDY)
    tokenizer = copy.copy(engine.tokenizer)
    tokenizer.eod_id = free.tokens[4]  # pretend the 5th generated token ends the document
    first = free.tokens.index(tokenizer.eod_id)
    eod_engine = Engine(engine.model, tokenizer)
    [out] = eod_engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, temperature=0.0))
    assert out.tokens == free.tokens[:first] and out.finish_reason == "stop"
    [full] = eod_engine.generate([PROMPTS[1]], GREEDY)
    assert full.tokens == free.tokens and full.finish_reason == "length"


def test_logprobs_are_the_models(engine: Engine) -> None:
    ids = engine.encode(PROMPTS[2])
    params = SamplingParams(max_new_tokens=5, temperature=0.0, logprobs=3, ignore_eod=True)
    [out] = engine.generate([PROMPTS[2]], params)
    tokens, logps = recompute_greedy(engine.model, ids, 5)
    assert out.tokens == tokens
    for lp, top, ref, tok in zip(out.logprobs, out.top_logprobs, logps, tokens, strict=True):
        assert lp == pytest.approx(float(ref[tok]), abs=1e-4)
        values, indices = ref.topk(3)
        assert list(top) == indices.tolist()
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)


def test_streaming_produces_the_same_completion(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=5, ignore_eod=True)
    [whole] = engine.generate([PROMPTS[3]], params)
    events = list(engine.stream(PROMPTS[3], params))
    assert [e.token for e in events] == whole.tokens
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    assert "".join(e.text for e in events) == whole.text


def test_seed_reproduces_samples(engine: Engine) -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed, ignore_eod=True)
        return engine.generate([PROMPTS[0]], params)[0].tokens

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_prompt_longer_than_context_is_an_error_or_truncated(engine: Engine) -> None:
    long_prompt = list(range(1, 61))
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eod=True)
    with pytest.raises(ValueError, match="context length 64"):
        engine.generate([long_prompt], params)
    [cut] = engine.generate([long_prompt], params, truncate=True)
    assert cut.prompt_tokens == long_prompt[-54:]
    assert cut.tokens == engine.generate([long_prompt[-54:]], params)[0].tokens


def test_requests_that_do_not_fit_one_batch_are_split(engine: Engine) -> None:
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eod=True) for n in (40, 2)]
    prompts = [[5, 6, 7], list(range(1, 50))]  # 49 + 40 > 64: they cannot share a batch
    requests = [engine.request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    assert not engine.fits(requests) and len(engine.plan_batches(requests)) == 2
    outs = engine.generate(prompts, params)
    assert [len(c.tokens) for c in outs] == [40, 2]


def test_cancelled_sequence_leaves_the_batch(engine: Engine) -> None:
    decoder = engine.decoder()
    indices, _ = decoder.add([Request(engine.encode(p), GREEDY) for p in PROMPTS[:2]])
    results = {i: Completion([]) for i in indices}
    for step in range(6):
        if step == 3:
            for event in decoder.cancel({indices[0]}):
                results[event.index].add(event)
        for event in decoder.step():
            results[event.index].add(event)
    assert results[indices[0]].finish_reason == "cancelled" and len(results[indices[0]].tokens) == 3
    assert decoder.live() == [indices[1]]
    while len(decoder):
        for event in decoder.step():
            results[event.index].add(event)
    assert results[indices[1]].tokens == engine.generate([PROMPTS[1]], GREEDY)[0].tokens


def test_bad_settings_are_errors(engine: Engine) -> None:
    for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(max_new_tokens=-1), dict(stop=[""])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            engine.generate(["x"], SamplingParams(**bad))
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([[1, 10**6]])


def test_sequences_joining_a_running_batch_decode_as_they_would_alone(engine: Engine) -> None:
    sampled = SamplingParams(max_new_tokens=6, temperature=0.9, seed=4, ignore_eod=True, repetition_penalty=1.2)
    first = engine.request(PROMPTS[3], SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eod=True))
    joiners = [engine.request(PROMPTS[0], GREEDY), engine.request("a", sampled)]
    too_long = engine.request(list(range(1, 40)), GREEDY)  # longer than the running cache: must wait
    decoder = engine.decoder()
    order, _ = decoder.add([first])
    results: dict[int, Completion] = {}
    for step in range(6):
        if step == 2:
            assert not decoder.can_add([too_long]) and decoder.can_add(joiners)
            order += decoder.add(joiners)[0]
        for event in decoder.step():
            results.setdefault(event.index, Completion([])).add(event)
    while len(decoder):
        for event in decoder.step():
            results[event.index].add(event)
    out = [results[i].tokens for i in order]
    assert out[0] == engine.generate([PROMPTS[3]], first.params)[0].tokens
    assert out[1] == engine.generate([PROMPTS[0]], GREEDY)[0].tokens
    assert out[2] == engine.generate(["a"], sampled)[0].tokens


def test_a_failing_sequence_ends_alone_and_the_batch_goes_on(engine: Engine) -> None:
    """Settings no validated request can have (top_k beyond int64 fails the prefill; a NaN penalty
    would fail nothing, but a failing detokenizer fails the step) end only their own row."""
    good = [engine.request(p, GREEDY) for p in PROMPTS[:2]]
    broken = Request(engine.encode("x"), SamplingParams(max_new_tokens=5, top_k=2**63))
    results: dict[int, Completion] = {}
    for event in engine.run([good[0], broken, good[1]]):
        results.setdefault(event.index, Completion([])).add(event)
    assert results[1].finish_reason == "error" and "overflow" in results[1].error.lower()
    expected = [engine.generate([p], GREEDY)[0].tokens for p in PROMPTS[:2]]
    assert [results[0].tokens, results[2].tokens] == expected

    decoder = engine.decoder()
    indices, _ = decoder.add(good)
    decoder.batch.rows[0].detok.add = lambda token: 1 / 0  # this row's step raises from now on
    events = decoder.step()
    assert [e.finish_reason for e in events] == ["error", None] and "ZeroDivisionError" in events[0].error
    assert decoder.live() == [indices[1]]


def test_extreme_settings_sample_finite_tokens_and_logprobs(engine: Engine) -> None:
    """At the edges of the valid ranges nothing non-finite is sampled from or reported."""
    import math

    for extreme in (dict(top_p=5e-324), dict(top_p=1e-30, temperature=100.0), dict(temperature=1e-300),
                    dict(repetition_penalty=0.01), dict(repetition_penalty=100.0, temperature=1e-9)):
        params = SamplingParams(max_new_tokens=6, seed=1, logprobs=3, ignore_eod=True, **extreme)
        [out] = engine.generate(["The quick"], params)
        assert len(out.tokens) == 6 and max(out.tokens) < engine.vocab_size, extreme
        values = out.logprobs + [v for top in out.top_logprobs for v in top.values()]
        assert all(math.isfinite(v) for v in values), extreme
    [tiny_p] = engine.generate(["The quick"], SamplingParams(max_new_tokens=6, top_p=5e-324, seed=1, ignore_eod=True))
    assert tiny_p.tokens == engine.generate(["The quick"], GREEDY)[0].tokens[:6]  # only the top token is kept


def test_non_finite_logits_still_give_valid_tokens_and_finite_logprobs(small_tokenizer) -> None:
    import math

    cfg = ModelConfig(vocab_size=small_tokenizer.vocab_size, seq_len=32, n_layers=1, hidden=32, n_heads=2,
                      padded_vocab_multiple=64)
    model = GPT(cfg)
    with torch.no_grad():
        model.ln_f.weight[0] = float("nan")  # every logit NaN, as from corrupted weights
    engine = Engine(model, small_tokenizer)
    for temperature in (0.0, 0.8):
        params = SamplingParams(max_new_tokens=4, temperature=temperature, logprobs=2, seed=0, ignore_eod=True)
        [out] = engine.generate(["The"], params)
        assert len(out.tokens) == 4 and all(0 <= t < cfg.vocab_size for t in out.tokens)
        assert all(math.isfinite(v) for v in out.logprobs + [v for d in out.top_logprobs for v in d.values()])


def test_settings_outside_their_range_are_refused_before_generation(engine: Engine) -> None:
    for bad, fragment in ((dict(top_k=engine.vocab_size + 1), "vocabulary size"),
                          (dict(top_k=2**63), "top_k"), (dict(temperature=float("nan")), "temperature"),
                          (dict(temperature=float("inf")), "temperature"), (dict(repetition_penalty=1e-300), "penalty"),
                          (dict(top_p=float("nan")), "top_p"), (dict(seed=-1), "seed"), (dict(stop="ab"), "stop"),
                          (dict(max_new_tokens=True), "max_new_tokens"), (dict(stop=["x"] * 5), "stop")):
        with pytest.raises(ValueError, match=fragment):
            engine.request("x", SamplingParams(**bad))


def test_a_prompt_certainly_too_long_is_refused_before_tokenization(engine: Engine, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text, specials=(): calls.append(text) or [1])
    with pytest.raises(ValueError, match="context length 64"):
        engine.request("y" * 1_000_000, GREEDY)
    assert not calls
    engine.request("y" * 10, GREEDY)
    assert calls == ["y" * 10]
