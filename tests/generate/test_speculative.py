"""Speculative decoding against decoding without it: greedy tokens identical, sampled tokens
distributed as the target's (a seeded chi-square test against the exact distribution)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chi2

from mtnlg.config import ModelConfig
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.generate.speculative import Speculation, lookup, make_speculation
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eod=True)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which costs tens of
    times the work itself when the cores are busy with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(vocab: int, std: float, seed: int, layers: int = 2, hidden: int = 64) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, seq_len=96, n_layers=layers, hidden=hidden, n_heads=4,
                           padded_vocab_multiple=8, init_std=std))


def prompts(vocab: int) -> list[list[int]]:
    """Mixed lengths (1 to 60 tokens), each repeating itself once: something for n-grams to find."""
    g = torch.Generator().manual_seed(1)
    return [2 * torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 3, 9, 30)] + [[5]]


def test_lookup_proposes_what_followed_the_latest_match() -> None:
    assert lookup([1, 2, 3, 4, 1, 2], 2) == [3, 4]
    assert lookup([1, 2, 3, 9, 2, 3, 7, 5, 2, 3], 2) == [7, 5]  # the latest match of (2, 3)
    assert lookup([1, 2, 3, 1, 2], 5) == [3, 1, 2]  # no match with 5 after it: the earliest, cut short
    assert lookup([4, 5, 6], 3) == [] and lookup([7], 3) == []


def test_kv_cache_truncate_rolls_back() -> None:
    cache = KVCache(1, 8)
    k = torch.arange(5.0).reshape(1, 1, 5, 1)
    cache.update(0, k, k)
    cache.advance(5)
    cache.truncate(2)
    keys, _ = cache.update(0, k[:, :, :1] + 10, k[:, :, :1])
    assert cache.length == 2 and keys.flatten().tolist() == [0.0, 1.0, 10.0]
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(3)


@pytest.mark.parametrize("std", [0.02, 0.3])  # a model that repeats itself, and one with varied output
def test_greedy_tokens_equal_decoding_without_speculation(std: float) -> None:
    target, vocab = model(300, std, 0), 300
    plain = Engine(target, None, max_batch_size=4)
    expected = [c.tokens for c in plain.generate(prompts(vocab), GREEDY)]
    draft = model(vocab, std, 1, layers=1, hidden=32)
    for kind in ("ngram", "draft"):
        spec = make_speculation(kind, 4, (draft, None), vocab)
        engine = Engine(target, None, max_batch_size=4, speculation=spec)
        assert [c.tokens for c in engine.generate(prompts(vocab), GREEDY)] == expected, kind  # batched
        assert [engine.generate([p], GREEDY)[0].tokens for p in prompts(vocab)[2:4]] == expected[2:4], kind
        assert spec.counts["proposed"] > 0
        if std == 0.02:  # the repeating model's guesses are mostly kept: several tokens per forward
            assert spec.acceptance_rate() > 0.5 and spec.counts["tokens"] > 1.5 * spec.counts["rows"], kind


def test_rows_that_ask_for_logprobs_decode_plainly() -> None:
    target = model(300, 0.02, 0)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=2, ignore_eod=True)
    spec = make_speculation("ngram", 4)
    [out] = Engine(target, None, speculation=spec).generate([[1, 2, 1, 2]], params)
    [ref] = Engine(target, None).generate([[1, 2, 1, 2]], params)
    assert out.tokens == ref.tokens and out.logprobs == ref.logprobs and spec.counts["proposed"] == 0


def exact_joint(m: GPT, prompt: list[int], n: int, temperature: float, top_k: int) -> torch.Tensor:
    """P(x_1..x_n | prompt) of sampling with these settings, for every sequence (vocab**n,)."""
    V = m.cfg.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))
    with torch.no_grad():
        logits = m(torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1))[:, :, :V].double()
    logits = logits[:, len(prompt) - 1 : -1] / temperature  # the logits each x_j was drawn from
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    logp = logits.log_softmax(-1).gather(2, seqs.unsqueeze(2)).squeeze(2)
    return logp.sum(1).exp()


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's test, cells expecting fewer than 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


@pytest.mark.parametrize("kind,temperature,top_k", [("ngram", 1.0, 0), ("draft", 0.8, 2)])
def test_sampled_tokens_follow_the_target_distribution(kind: str, temperature: float, top_k: int) -> None:
    """3 tokens of a 3-token vocabulary (27 sequences), 600 seeded samples in batches of 2."""
    V, n, prompt = 3, 3, [1, 2, 0, 1, 2]
    target, draft = model(V, 0.1, 0), model(V, 0.1, 5, layers=1, hidden=32)
    spec = make_speculation(kind, 2, (draft, None), V)
    engine = Engine(target, None, max_batch_size=2, speculation=spec)
    params = [SamplingParams(max_new_tokens=n, temperature=temperature, top_k=top_k, seed=s, ignore_eod=True)
              for s in range(600)]
    out = engine.generate([prompt] * len(params), params)
    index = torch.tensor([sum(t * V ** (n - 1 - j) for j, t in enumerate(c.tokens)) for c in out])
    counts = torch.bincount(index, minlength=V**n).double()
    c = spec.counts
    assert 0 < c["accepted"] < c["proposed"] and c["tokens"] > c["rows"]  # kept, rejected, several per step
    assert chi_square_p(counts, exact_joint(target, prompt, n, temperature, top_k)) > 1e-3
    wrong = exact_joint(draft, prompt, n, temperature, top_k)  # the test tells a different distribution apart
    assert chi_square_p(counts, wrong) < 1e-4


def test_draft_with_another_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="draft model's vocabulary has 8 tokens, the target's 300"):
        make_speculation("draft", 4, (model(8, 0.02, 0), None), 300)
    with pytest.raises(ValueError, match="needs a draft model"):
        make_speculation("draft", 4, None, 300)
    with pytest.raises(ValueError, match=">= 1"):
        Speculation(lookup, 0)  # type: ignore[arg-type]


def test_mtnlg_generate_with_a_draft_checkpoint(tmp_path, small_tokenizer, capsys) -> None:
    from mtnlg.checkpoint.model import save_model
    from mtnlg.cli import main
    from mtnlg.config import Config
    from mtnlg.data.tokenizer import Tokenizer

    def saved(name: str, tokenizer: Tokenizer, layers: int, seed: int) -> str:
        cfg = Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layers=layers, hidden=32,
                                       n_heads=2, padded_vocab_multiple=64, init_std=0.02))
        torch.manual_seed(seed)
        return str(save_model(tmp_path / name, GPT(cfg.model), cfg, tokenizer))

    target, draft = saved("target", small_tokenizer, 2, 0), saved("draft", small_tokenizer, 1, 1)
    args = ["generate", "--checkpoint", target, "--prompt", "The quick brown fox. The quick", "--max-new-tokens",
            "12", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative", "draft", "--draft-checkpoint", draft, "--num-speculative-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "speculative (draft, k=3):" in out.err and "proposed tokens accepted" in out.err
    other = saved("other", Tokenizer.train(["Sphinx of black quartz, judge my vow. " * 8], vocab_size=300), 1, 1)
    assert main([*args, "--speculative", "draft", "--draft-checkpoint", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--draft-checkpoint {other}: the draft model's" in err[0] and "tokenizer" in err[0]
    assert main([*args, "--draft-checkpoint", draft]) == 2  # a draft without --speculative draft
    assert "only with --speculative draft" in capsys.readouterr().err
