"""Sampling functions against their definitions and against Hugging Face's logits processors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtnlg.generate.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    draw_uniforms,
    greedy,
    make_generator,
    sample,
    select_tokens,
    top_k_filter,
    top_p_filter,
)

hf_logits = pytest.importorskip("transformers.generation.logits_process")


def _rows(B: int, V: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _settings(B: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> tuple:
    return torch.full((B,), temperature), torch.full((B,), top_k), torch.full((B,), top_p)


def test_top_k_1_equals_greedy() -> None:
    logits = _rows(64, 500)
    uniform = torch.rand(64, generator=torch.Generator().manual_seed(1))
    for temperature in (0.5, 1.0, 3.0):
        chosen = select_tokens(logits, *_settings(64, temperature, top_k=1), uniform)
        assert torch.equal(chosen, greedy(logits))


def test_temperature_zero_is_greedy_whatever_the_draw() -> None:
    logits = _rows(8, 100)
    for u in (0.0, 0.5, 0.999):
        assert torch.equal(select_tokens(logits, *_settings(8, 0.0), torch.full((8,), u)), logits.argmax(-1))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    p=st.floats(0.01, 0.99),
    scale=st.floats(0.1, 8.0),
)
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(seed: int, p: float, scale: float) -> None:
    logits = _rows(1, 50, seed)[0] * scale
    kept = torch.isfinite(top_p_filter(logits.unsqueeze(0), p)[0])
    probs = logits.softmax(-1)
    kept_probs = probs[kept]
    assert kept_probs.sum() >= p - 1e-5  # enough mass ...
    assert kept_probs.sum() - kept_probs.min() < p + 1e-5  # ... and no smaller set would do
    if (~kept).any():
        assert kept_probs.min() >= probs[~kept].max()  # the most likely tokens are the ones kept


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(p: float) -> None:
    logits = _rows(6, 300, seed=3)
    ours = top_p_filter(logits, p)
    ref = hf_logits.TopPLogitsWarper(top_p=p, min_tokens_to_keep=1)(None, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_matches_transformers_and_keeps_k(k: int) -> None:
    logits = _rows(6, 300, seed=4)
    ours = top_k_filter(logits, k)
    ref = hf_logits.TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert (torch.isfinite(ours).sum(-1) == k).all()


def test_repetition_penalty_matches_transformers() -> None:
    logits = _rows(3, 40, seed=5)
    seen_ids = torch.tensor([[1, 2, 3, 7], [0, 0, 5, 39], [10, 11, 12, 13]])
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter(1, seen_ids, True)
    ours = apply_repetition_penalty(logits, seen, 1.7)
    ref = hf_logits.RepetitionPenaltyLogitsProcessor(penalty=1.7)(seen_ids, logits.clone())
    torch.testing.assert_close(ours, ref)


def test_per_row_settings_equal_row_by_row_calls() -> None:
    logits = _rows(4, 200, seed=6)
    temperature = torch.tensor([0.0, 0.7, 1.3, 1.0])
    top_k = torch.tensor([0, 10, 0, 3])
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.5])
    uniform = torch.tensor([0.3, 0.9, 0.1, 0.6])
    batched = select_tokens(logits, temperature, top_k, top_p, uniform)
    for i in range(4):
        row = slice(i, i + 1)
        assert batched[i] == select_tokens(logits[row], temperature[row], top_k[row], top_p[row], uniform[row])[0]


def test_sample_follows_the_distribution_and_never_picks_filtered_tokens() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), -1.0]])
    gen = make_generator(0)
    draws = torch.stack([sample(logits, draw_uniforms([gen])) for _ in range(20_000)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[3] == 0
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.015, rtol=0)


def test_seeded_generators_reproduce_and_differ() -> None:
    logits = _rows(1, 1000, seed=7).expand(50, -1).contiguous()
    temperature, top_k, top_p = _settings(50, 1.0)

    def run(seed: int) -> torch.Tensor:
        gens = [make_generator(seed + i) for i in range(50)]
        return select_tokens(logits, temperature, top_k, top_p, draw_uniforms(gens))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_temperature_scales_logits() -> None:
    logits = _rows(2, 10)
    expected = logits / torch.tensor([[0.5], [2.0]])
    torch.testing.assert_close(apply_temperature(logits, torch.tensor([0.5, 2.0])), expected)
