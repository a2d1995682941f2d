"""Evaluate a checkpoint: perplexity, cloze (LAMBADA-style) and multiple choice, zero- or few-shot.

Every task reduces to one operation, ``Scorer.score``: for windows of token ids, the
log-probability of each of a window's last ``n`` tokens given the tokens before it, and whether
each was the model's greedy choice. Windows are batched longest first and right-padded, the
padding marked by the attention mask (a batch without padding, e.g. full perplexity windows,
takes attention's faster causal-only path: with right padding the causal mask alone already
keeps every real token from seeing padding, which only follows it); the output layer runs only
on the positions scored, so memory does not grow with the vocabulary times the batch's length.

- ``perplexity``: each document is scored on its own, every token after the first given those
  before it (what ``GPT2LMHeadModel(labels=ids)`` averages); ``prepend_eod`` puts the
  end-of-document token first so the first token is scored too (lm-eval's rolling
  log-likelihood). A document longer than the context is scored in windows of the context length
  that start every ``stride`` tokens, each scoring the tokens the previous one did not reach:
  Hugging Face's strided perplexity ("Perplexity of fixed-length models"). Reports the mean token
  NLL (nats), its exp (perplexity) and bits per byte: the NLL in bits over the UTF-8 bytes of the
  scored tokens (special tokens count no bytes), comparable across tokenizers.
- ``cloze``: a passage's last word (possibly several tokens) given the rest; correct when every
  token of it is the greedy prediction; ``perplexity`` is exp of the mean negative
  log-likelihood of the whole word (lm-eval's LAMBADA metrics).
- ``choice``: the choice with the highest summed log-likelihood (``acc``), or highest
  log-likelihood per character of the choice (``acc_norm``), as lm-eval computes them.

Results are plain dicts of numbers (JSON) with a text table for people; ``mtnlg evaluate`` runs
them from the command line.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mtnlg.checkpoint.convert import load_tokenizer
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.eval import data as eval_data
from mtnlg.eval.data import DELIMITER, Item, is_indexed
from mtnlg.generate.load import load_for_inference
from mtnlg.model.gpt import GPT

LOGIT_ROWS = 1024  # positions sent through the output layer at a time (bounds the (rows, vocab) logits)


@dataclass(frozen=True)
class Window:
    """Token ids to score: the model reads ``ids[:-1]`` and scores the last ``n_scored`` of ``ids``."""

    ids: tuple[int, ...]
    n_scored: int


@dataclass(frozen=True)
class Scored:
    """The log-probabilities (nats) of a window's scored tokens, and whether each was the argmax."""

    logprobs: np.ndarray
    greedy: np.ndarray

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())


class Scorer:
    """Batched log-likelihoods under a GPT (plain, int8 or converted; any device) and its tokenizer."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 8, progress: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.vocab_size = model.cfg.vocab_size  # logits of the padded ids beyond it are not part of the softmax
        self.seq_len = model.cfg.seq_len
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        quantize: str | None = None,
        device: str = "cpu",
        batch_size: int = 8,
        tokenizer: str | Path | None = None,
        progress: bool = False,
        context: dict | None = None,
    ) -> Scorer:
        """Load any checkpoint generation loads (fp32, int8, converted from HF), ``tokenizer`` replacing its own
        (``context``: its context length and RoPE scaling overridden, as ``load_for_inference`` does)."""
        model, cfg, found = load_for_inference(path, quantize, device, batch_size, context)
        tok = load_tokenizer(tokenizer, cfg.model.vocab_size) if tokenizer else found
        if tok is None:
            raise ValueError(f"{path} has no tokenizer (converted from an HF directory without one?): "
                             "give --tokenizer DIR")
        return cls(model, tok, batch_size, progress)

    # -- scoring -------------------------------------------------------------------------------

    def score(self, windows: Sequence[Window], desc: str = "scoring") -> list[Scored]:
        """Score every window, in batches of similar length; results in the order given."""
        for w in windows:
            if not 1 <= w.n_scored < len(w.ids) or len(w.ids) > self.seq_len + 1:
                raise ValueError(f"cannot score {w.n_scored} of {len(w.ids)} tokens with context {self.seq_len}")
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        out: list[Scored | None] = [None] * len(windows)
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not self.progress or len(batches) < 2):
            for i, scored in zip(batch, self._score_batch([windows[i] for i in batch]), strict=True):
                out[i] = scored
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(self, windows: Sequence[Window]) -> list[Scored]:
        lengths = [len(w.ids) - 1 for w in windows]  # tokens the model reads
        x = torch.zeros(len(windows), max(lengths), dtype=torch.long)
        for row, (w, n) in enumerate(zip(windows, lengths, strict=True)):
            x[row, :n] = torch.tensor(w.ids[:-1])
        mask = None
        if min(lengths) < x.shape[1]:  # right padding: (B, T), True on real tokens
            mask = (torch.arange(x.shape[1]).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(self.device)
        h = self.model.hidden_states(x.to(self.device), attention_mask=mask)  # (B, T, C)
        # Position p predicts token p + 1: a window's last n tokens come from its positions [T_w - n, T_w).
        rows = torch.cat([h[r, n - w.n_scored : n] for r, (w, n) in enumerate(zip(windows, lengths, strict=True))])
        targets = torch.tensor([t for w in windows for t in w.ids[-w.n_scored :]], device=self.device)
        logprobs, greedy = self._token_logprobs(rows, targets)
        splits = np.cumsum([w.n_scored for w in windows])[:-1]
        return [Scored(lp, g) for lp, g in zip(np.split(logprobs, splits), np.split(greedy, splits), strict=True)]

    def _token_logprobs(self, rows: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """log p(target) under the softmax over the real vocabulary, and target == argmax, per row."""
        logprobs, greedy = [], []
        for h, t in zip(rows.split(LOGIT_ROWS), targets.split(LOGIT_ROWS), strict=True):
            logits = self.model.lm_head(h)[:, : self.vocab_size].float()  # (N, V)
            logprobs.append(logits.log_softmax(-1).gather(1, t.unsqueeze(1)).squeeze(1).double().cpu())
            greedy.append((logits.argmax(-1) == t).cpu())
        return torch.cat(logprobs).numpy(), torch.cat(greedy).numpy()

    # -- requests ------------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a context and its continuation, split as lm-eval splits them: the context's
        trailing whitespace moves to the continuation, the pair is encoded whole (so a token may not
        straddle the boundary differently than in running text), and an empty context is the
        end-of-document token."""
        stripped = context.rstrip()
        continuation, context = context[len(stripped) :] + continuation, stripped
        context_ids = self.tokenizer.encode(context) if context else []
        continuation_ids = self.tokenizer.encode(context + continuation)[len(context_ids) :]
        if not continuation_ids:
            raise ValueError(f"nothing to score: the continuation {continuation!r} has no tokens")
        return context_ids or [self.tokenizer.eod_id], continuation_ids

    def pair_window(self, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> Window:
        """The window scoring a continuation given its context, cut from the left to fit the context length
        (a continuation longer than the context length has only its last ``seq_len`` tokens scored)."""
        ids = (list(context_ids) + list(continuation_ids))[-(self.seq_len + 1) :]
        return Window(tuple(ids), min(len(continuation_ids), len(ids) - 1))

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "log-likelihood") -> list[Scored]:
        """The scored tokens of each continuation given its context (text pairs)."""
        return self.score([self.pair_window(*self.encode_pair(c, x)) for c, x in pairs], desc)

    def document_windows(
        self, ids: Sequence[int], stride: int | None = None, prepend_eod: bool = False
    ) -> list[Window]:
        """Hugging Face's strided perplexity: windows of at most ``seq_len`` tokens starting every ``stride``
        tokens, each scoring its tokens after the previous window's end, but not its own first token.

        Together they score every token but the document's first (with ``prepend_eod``: every token,
        the first given the end-of-document token), each with at least ``seq_len - stride`` tokens of
        context. The default stride, ``seq_len - 1``, makes windows that share one token (the context
        of the next window's first scored token): each token is read once, as in lm-eval's rolling
        windows. ``stride == seq_len`` (HF's non-overlapping windows) leaves each window's first token unscored.
        """
        stride = stride or max(self.seq_len - 1, 1)
        if not 1 <= stride <= self.seq_len:
            raise ValueError(f"stride must be in [1, {self.seq_len}] (the context length), got {stride}")
        ids = [self.tokenizer.eod_id, *ids] if prepend_eod else list(ids)
        windows, scored_to = [], 0
        for begin in range(0, len(ids), stride):
            end = min(begin + self.seq_len, len(ids))
            first = max(scored_to, begin + 1)  # a window's first token has nothing before it to be scored from
            if end > first:
                windows.append(Window(tuple(ids[begin:end]), end - first))
            scored_to = end
            if end == len(ids):
                break
        return windows

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for: a byte-level BPE token's string has one character per
        byte; special tokens (end of document, chat markers) and ids beyond the tokenizer stand for none."""
        table = np.zeros(max(self.vocab_size, self.tokenizer.vocab_size), dtype=np.int64)
        special = set(self.tokenizer.hf.get_added_tokens_decoder())
        for token, i in self.tokenizer.hf.get_vocab(with_added_tokens=True).items():
            table[i] = 0 if i in special else len(token)
        return table


# -- tasks -----------------------------------------------------------------------------------------


def perplexity(
    scorer: Scorer,
    documents: Sequence[str | Sequence[int] | np.ndarray],
    stride: int | None = None,
    prepend_eod: bool = False,
) -> dict[str, float]:
    """Mean token NLL, perplexity and bits per byte of documents (text, or token ids), each scored on its own."""
    encoded = [scorer.tokenizer.encode(d) if isinstance(d, str) else [int(t) for t in d] for d in documents]
    for i, ids in enumerate(encoded):  # token ids from a dataset (an indexed one, or given as ids)
        if ids and not 0 <= min(ids) <= max(ids) < scorer.vocab_size:
            raise ValueError(f"document {i} has token id {max(ids) if max(ids) >= scorer.vocab_size else min(ids)}, "
                             f"outside the model's vocabulary of {scorer.vocab_size} (model.vocab_size): the data "
                             "was tokenized with another tokenizer")
    windows = [w for ids in encoded for w in scorer.document_windows(ids, stride, prepend_eod)]
    if not windows:
        raise ValueError("no tokens to score: every document has at most one token (use --prepend-eod to score it)")
    scored = scorer.score(windows, "perplexity")
    nll = -sum(s.total for s in scored)
    tokens = sum(w.n_scored for w in windows)
    n_bytes = int(sum(scorer.token_bytes[list(w.ids[-w.n_scored :])].sum() for w in windows))
    return {
        "documents": len(documents),
        "tokens": tokens,
        "nll": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "bytes": n_bytes,
        "bits_per_byte": nll / n_bytes / math.log(2) if n_bytes else math.nan,
    }


def cloze(scorer: Scorer, items: Sequence[Item]) -> dict[str, float]:
    """Accuracy of greedily predicting each item's target word, and the perplexity of the targets."""
    scored = scorer.loglikelihood([(item.context, DELIMITER + item.answer) for item in items], "cloze")
    return {
        "items": len(items),
        "acc": float(np.mean([s.greedy.all() for s in scored])),
        "perplexity": math.exp(-float(np.mean([s.total for s in scored]))),
        "target_tokens": float(np.mean([s.logprobs.size for s in scored])),
    }


def choice(scorer: Scorer, items: Sequence[Item]) -> dict[str, float]:
    """Accuracy of picking the most likely choice, by summed and per-character log-likelihood."""
    pairs = [(item.context, DELIMITER + c) for item in items for c in item.choices]
    totals = iter([s.total for s in scorer.loglikelihood(pairs, "choice")])
    acc, acc_norm = [], []
    for item in items:
        lls = np.array([next(totals) for _ in item.choices])
        lengths = np.array([len(c) for c in item.choices], dtype=np.float64)
        acc.append(int(np.argmax(lls)) == item.label)
        acc_norm.append(int(np.argmax(lls / lengths)) == item.label)
    return {"items": len(items), "acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: a task on a data file, and the options of ``mtnlg evaluate``."""

    task: str
    data: str
    shots: int = 0
    fewshot_data: str | None = None
    seed: int = 0
    stride: int | None = None
    prepend_eod: bool = False
    json_key: str = "text"
    split: str = "949,50,1"
    split_name: str = "valid"


def read_task(spec: EvalSpec) -> list:
    """The documents (perplexity) or items with their few-shot prompts (cloze, choice) of ``spec``,
    read and checked before any model loads, so bad data fails fast."""
    if spec.task not in eval_data.TASKS:
        raise ValueError(f"unknown task {spec.task!r}; choose one of: {', '.join(eval_data.TASKS)}")
    if spec.task == "perplexity":
        if spec.shots:
            raise ValueError("--shots is for the cloze and choice tasks: perplexity scores documents as they are")
        if eval_data.is_indexed(spec.data):
            return eval_data.read_indexed_split(spec.data, spec.split, spec.split_name)
        return eval_data.read_documents(spec.data, spec.json_key)
    items = eval_data.read_items(spec.data, spec.task)
    if not spec.shots:
        return items
    if not spec.fewshot_data:
        raise ValueError("--shots needs --fewshot-data FILE (solved examples in the task's format)")
    pool = eval_data.read_items(spec.fewshot_data, spec.task)
    return eval_data.with_fewshot(items, pool, spec.shots, spec.seed)


def evaluate(scorer: Scorer, spec: EvalSpec, data: list | None = None) -> dict[str, object]:
    """Run one task on ``data`` (default: ``read_task(spec)``): its metrics, after the settings that produced them."""
    data = read_task(spec) if data is None else data
    head: dict[str, object] = {"task": spec.task, "data": spec.data}
    if spec.task == "perplexity":
        if is_indexed(spec.data):
            head["split"] = f"{spec.split_name} of {spec.split}"
        stride = spec.stride or max(scorer.seq_len - 1, 1)
        head.update(stride=stride, prepend_eod=spec.prepend_eod)
        try:
            return {**head, **perplexity(scorer, data, stride, spec.prepend_eod)}
        except ValueError as exc:
            raise ValueError(f"{spec.data}: {exc}") from None
    if spec.shots:
        head.update(shots=spec.shots, seed=spec.seed)
    return {**head, **(cloze if spec.task == "cloze" else choice)(scorer, data)}


def format_table(results: dict[str, object]) -> str:
    """The results as aligned ``name  value`` lines (floats to 4 significant decimals)."""
    width = max(len(k) for k in results)
    lines = []
    for key, value in results.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
