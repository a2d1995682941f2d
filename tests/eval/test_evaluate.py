"""Evaluation: perplexity against GPT2LMHeadModel, cloze and choice under a model whose logits the
test sets, few-shot prompts, and the command line's handling of bad data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mtnlg.cli import main
from mtnlg.config import ModelConfig
from mtnlg.eval.data import Item, with_fewshot
from mtnlg.eval.evaluate import Scorer, choice, cloze, perplexity

transformers = pytest.importorskip("transformers")

SEQ_LEN = 32
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs. The dog",
    "fox " * 30,  # longer than the context: scored in windows
    "x",  # one token: nothing to score without --prepend-eod
]


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, small_tokenizer):
    """A random GPT2LMHeadModel (context 32, a vocabulary the padded mtnlg one exceeds) and its
    conversion to an mtnlg checkpoint with the tokenizer."""
    from mtnlg.checkpoint.convert import from_hf

    root = tmp_path_factory.mktemp("eval-hf")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=small_tokenizer.vocab_size, n_positions=SEQ_LEN, n_embd=32,
                                     n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # sharper predictions than the near-uniform initial ones
        hf.lm_head.weight.mul_(20)
    hf.save_pretrained(root / "hf")
    small_tokenizer.save(root / "hf")
    from_hf(root / "hf", root / "ckpt")
    return hf, root / "ckpt"


def _hf_strided_nll(hf, ids: list[int], stride: int) -> tuple[float, int]:
    """Hugging Face's "Perplexity of fixed-length models" loop: summed NLL and tokens scored.

    The documented loop weighs each window's mean loss by (valid labels - 1); the labels its loss
    averages are the valid ones after the shift, counted here exactly."""
    enc = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + SEQ_LEN, len(ids))
        trg_len = end - prev_end
        input_ids = enc[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        n = int((target_ids[:, 1:] != -100).sum())
        if n:
            with torch.no_grad():
                nll += hf(input_ids, labels=target_ids).loss.item() * n
            count += n
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize("stride", [None, 8, SEQ_LEN])
def test_perplexity_matches_hf(hf_checkpoint, small_tokenizer, stride):
    hf, ckpt = hf_checkpoint
    scorer = Scorer.from_checkpoint(ckpt, batch_size=3)  # batches mix lengths: right padding is exercised
    got = perplexity(scorer, DOCS, stride=stride)
    # The default stride is seq_len - 1: consecutive windows share one token, so every token is scored.
    totals = [_hf_strided_nll(hf, small_tokenizer.encode(d), stride or SEQ_LEN - 1) for d in DOCS]
    nll, tokens = sum(t[0] for t in totals), sum(t[1] for t in totals)
    assert got["tokens"] == tokens
    assert got["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    if stride is None:  # each document's tokens but its first
        assert tokens == sum(len(small_tokenizer.encode(d)) - 1 for d in DOCS)


def test_prepend_eod_scores_every_token_and_every_byte(hf_checkpoint, small_tokenizer):
    hf, ckpt = hf_checkpoint
    scorer = Scorer.from_checkpoint(ckpt)
    short = DOCS[:2]
    got = perplexity(scorer, short, prepend_eod=True)
    eod = small_tokenizer.eod_id
    nll = tokens = 0
    for d in short:
        ids = torch.tensor([[eod, *small_tokenizer.encode(d)]])
        with torch.no_grad():
            n = ids.shape[1] - 1
            nll += hf(ids, labels=ids).loss.item() * n
        tokens += n
    assert got["tokens"] == tokens
    assert got["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    n_bytes = sum(len(d.encode("utf-8")) for d in short)
    assert got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


class BigramLM(nn.Module):
    """A model whose logits the test sets: the logits after token a are ``table[a]``.

    The padded vocabulary's extra logits are huge, so scoring that forgets to leave them out of the
    softmax fails."""

    def __init__(self, table: torch.Tensor, padded: int) -> None:
        super().__init__()
        vocab = table.shape[0]
        self.cfg = ModelConfig(vocab_size=vocab, seq_len=64, n_layers=1, hidden=32, n_heads=2)
        weight = torch.full((padded, padded), 1e4)
        weight[:vocab, :vocab] = table.T  # logits = onehot(a) @ weight.T = weight[:, a] = table[a]
        self.lm_head = nn.Linear(padded, padded, bias=False)
        self.lm_head.weight.data = weight
        self.padded = padded

    def hidden_states(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.one_hot(x, self.padded).float()  # (B, T, V_padded)


def _bigram_loglik(table: torch.Tensor, ids: list[int], n: int) -> tuple[float, bool]:
    """Log-likelihood of the last n of ``ids`` and whether each was the argmax, computed directly."""
    logp = table.double().log_softmax(-1)
    pairs = list(zip(ids[-n - 1 : -1], ids[-n:], strict=True))
    return sum(logp[a, b].item() for a, b in pairs), all(int(table[a].argmax()) == b for a, b in pairs)


def _pair_ids(tok, context: str, continuation: str) -> tuple[list[int], int]:
    whole = tok.encode(context + continuation)
    return whole, len(whole) - len(tok.encode(context))


@pytest.fixture
def bigram(small_tokenizer):
    torch.manual_seed(1)
    table = torch.randn(small_tokenizer.vocab_size, small_tokenizer.vocab_size)
    return table, small_tokenizer


def _make_greedy(table: torch.Tensor, ids: list[int], n: int) -> None:
    for a, b in zip(ids[-n - 1 : -1], ids[-n:], strict=True):
        table[a, b] = table[a].max() + 5


def test_cloze_greedy_words_and_target_perplexity(bigram):
    table, tok = bigram
    items = [Item("Pack my box with five dozen", ("liquor",)), Item("The quick brown", ("foxjugs",)),
             Item("over the lazy", ("dog",))]
    whole = [_pair_ids(tok, it.context, " " + it.answer) for it in items]
    assert whole[1][1] >= 2, "the second target must be several tokens"
    _make_greedy(table, *whole[0])
    _make_greedy(table, whole[1][0][:-1], whole[1][1] - 1)  # all but its last token: not greedy as a whole
    scorer = Scorer(BigramLM(table, 448), tok, batch_size=2)
    got = cloze(scorer, items)
    expected = [_bigram_loglik(table, ids, n) for ids, n in whole]
    assert [g for _, g in expected] == [True, False, False]
    assert got["acc"] == pytest.approx(1 / 3)
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in expected])), rel=1e-5)


def test_choice_acc_and_length_normalised(bigram):
    table, tok = bigram
    items = [Item("The quick brown", ("fox", "dozen liquor jugs", "dog"), 0),
             Item("Pack my box with", ("five", "the lazy dog jumps"), 1),
             Item("over the", ("lazy", "box"), 1)]
    _make_greedy(table, *_pair_ids(tok, items[0].context, " fox"))
    _make_greedy(table, *_pair_ids(tok, items[2].context, " lazy"))  # the wrong one
    scorer = Scorer(BigramLM(table, 448), tok, batch_size=4)
    got = choice(scorer, items)
    acc, acc_norm = [], []
    for it in items:
        lls = np.array([_bigram_loglik(table, *_pair_ids(tok, it.context, " " + c))[0] for c in it.choices])
        acc.append(np.argmax(lls) == it.label)
        acc_norm.append(np.argmax(lls / [len(c) for c in it.choices]) == it.label)
    assert acc[0] and not acc[2]
    assert got["acc"] == pytest.approx(np.mean(acc)) and got["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert got["items"] == 3


def test_fewshot_prompts_are_seeded_and_exclude_the_item():
    pool = [Item(f"question {i}?", (f"answer {i}", "other"), 0) for i in range(6)]
    items = pool[:4]
    first = with_fewshot(items, pool, 3, seed=1)
    assert first == with_fewshot(items, pool, 3, seed=1)
    assert first != with_fewshot(items, pool, 3, seed=2)
    for item, prompted in zip(items, first, strict=True):
        shots = prompted.context.split("\n\n")
        assert len(shots) == 4 and shots[-1] == item.context
        assert item.solved() not in shots[:-1]
        assert all(s in {p.solved() for p in pool} for s in shots[:-1])
        assert prompted.choices == item.choices and prompted.label == item.label
    assert with_fewshot(items[::-1], pool, 3, seed=1) == first[::-1]  # each prompt depends on its item only
    with pytest.raises(ValueError, match="6 shots need"):
        with_fewshot(items, pool, 6, seed=0)


def test_cli_reports_results_and_bad_data(hf_checkpoint, tmp_path, capsys):
    _, ckpt = hf_checkpoint
    data = tmp_path / "choice.jsonl"
    data.write_text("\n".join(json.dumps({"context": "The quick brown", "choices": [c, "dog"], "label": 0})
                              for c in ("fox", "box")) + "\n", encoding="utf-8")
    out = tmp_path / "r.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--task", "choice", "--data", str(data),
                 "--json", "--out", str(out), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and printed["items"] == 2 and 0 <= printed["acc"] <= 1
    cases = {
        '{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a", "choices": ["b"': ":2: malformed JSON",
        '{"context": "a", "label": 0}\n': ":1: missing field 'choices'",
        '\n{"context": "a", "choices": ["b", "c"], "label": 2}\n': ":2: field 'label' is 2",
    }
    for text, message in cases.items():
        data.write_text(text, encoding="utf-8")
        assert main(["evaluate", "--checkpoint", str(ckpt), "--task", "choice", "--data", str(data)]) == 2
        assert f"mtnlg evaluate: error: {data}{message}" in capsys.readouterr().err


def test_indexed_split_and_int8(hf_checkpoint, small_tokenizer, tmp_path):
    """An indexed dataset's split is scored document by document (each ending in <|endoftext|>, as
    preprocessing stored it); an int8 load scores within quantization error of fp32."""
    from mtnlg.data.preprocess import preprocess
    from mtnlg.eval.evaluate import EvalSpec, evaluate

    _, ckpt = hf_checkpoint
    texts = [f"{d} number {i}" for i, d in enumerate(DOCS * 2)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    preprocess([tmp_path / "docs.jsonl"], ckpt / "tokenizer", tmp_path / "docs", progress=False)
    scorer = Scorer.from_checkpoint(ckpt, batch_size=4)
    got = evaluate(scorer, EvalSpec("perplexity", str(tmp_path / "docs"), split="6,0,2", split_name="test"))
    test_docs = [small_tokenizer.encode(t) + [small_tokenizer.eod_id] for t in texts[6:]]
    assert got["documents"] == 2 and got["split"] == "test of 6,0,2"
    assert got["nll"] == pytest.approx(perplexity(scorer, test_docs)["nll"], rel=1e-9)
    int8 = perplexity(Scorer.from_checkpoint(ckpt, quantize="int8"), test_docs)
    assert int8["nll"] != got["nll"] and int8["nll"] == pytest.approx(got["nll"], rel=0.02)
    from mtnlg.data.indexed import IndexedDatasetWriter

    writer = IndexedDatasetWriter(tmp_path / "other", np.uint16)  # ids of a larger vocabulary
    for doc in ([1, 2, 3], [4, scorer.vocab_size + 5, 6]):
        writer.add_document(doc)
    writer.finalize()
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'other'}: document 1 has token id {scorer.vocab_size + 5}, "
                                         r"outside the model's vocabulary"):
        evaluate(scorer, EvalSpec("perplexity", str(tmp_path / "other"), split="0,0,1", split_name="test"))


def test_a_mixture_of_experts_checkpoint_scores_as_its_model_computes(small_tokenizer, tmp_path):
    """MoE blocks run through the same scoring path: a document's NLL is the mean of the model's own
    log-probabilities over the real vocabulary (dropless routing: batching changes no token's experts)."""
    from mtnlg.checkpoint.model import save_model
    from mtnlg.config import Config
    from mtnlg.model.gpt import GPT

    model_cfg = ModelConfig(vocab_size=small_tokenizer.vocab_size, seq_len=64, n_layers=2, hidden=32, n_heads=4,
                            moe_experts=4, moe_top_k=2, padded_vocab_multiple=64)
    torch.manual_seed(0)
    model = GPT(model_cfg).eval()
    save_model(tmp_path / "moe", model, Config(model=model_cfg), small_tokenizer)
    ids = small_tokenizer.encode(DOCS[0])
    got = perplexity(Scorer.from_checkpoint(tmp_path / "moe", batch_size=2), [ids])
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0, :, : model_cfg.vocab_size]
    want = -torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(ids[1:])[:, None]).mean()
    assert got["nll"] == pytest.approx(float(want), rel=1e-5)
