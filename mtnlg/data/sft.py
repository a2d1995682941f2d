"""Instruction data for supervised fine-tuning: records -> masked, packed samples for the one training loop.

Input: JSONL files, one record a line, either ``{"prompt": ..., "completion": ...}`` (rendered as a
user turn answered by an assistant turn) or ``{"messages": [{"role": ..., "content": ...}, ...]}``,
written out by the tokenizer's chat template (``mtnlg.data.chat_template``). The loss counts only what
the assistant says (its content and the ``<|end|>`` closing it): every other target is -100, which
``cross_entropy_loss`` ignores, so the prompt conditions the answer but is never learned.

A sample has T + 1 positions (T = ``model.seq_len``) and stacks rows, aligned by position:

- packed (``finetune.pack``, the default): (3, T + 1) tokens, labels, document ids. Records share a
  row back to back; the model's ``document_ids`` keeps their attention apart and restarts positions
  at each one, so a packed record is computed exactly as if it ran alone, with far less padding;
- padded: (2, T + 1) tokens and labels, one record a row, padding at the end (causal attention never
  looks ahead, so the padding changes nothing before it; this layout also runs under a pipeline).

Labels hold the token where it is trained and -100 elsewhere; ``split_batch`` shifts them into
next-token targets. A record's first label is always -100: in a packed row it is the target of the
previous record's last token, which must not learn to predict across records.

Bad records (``file:line: why``) are counted and the first ones reported, as ``mtnlg preprocess``
does; more than ``finetune.max_bad_records`` stop the run. A record longer than the context is cut
to it (and counted); one whose assistant part is cut away entirely is bad.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtnlg.config import Config, ConfigError
from mtnlg.data.batch import DOCUMENTS, LABELS, TOKENS
from mtnlg.data.chat_template import ChatTemplate, Message
from mtnlg.data.indexed import DataError
from mtnlg.data.jsonl import MAX_EXAMPLES, BadLine, numbered_lines, parse_json_object, skipped_report
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.loss import IGNORE_INDEX

# -- records ---------------------------------------------------------------------------------------


def parse_record(raw: bytes) -> list[Message]:
    """The messages of one JSONL record, or :class:`BadLine` saying why it has none."""
    obj = parse_json_object(raw)
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadLine("'messages' is not a non-empty list", type(messages).__name__)
        return messages
    if "prompt" in obj and "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise BadLine(f"{key!r} is not a string", type(obj[key]).__name__)
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise BadLine("neither prompt + completion nor messages", f"keys: {', '.join(list(obj)[:5])}")


@dataclass
class Record:
    """One record's tokens and labels (the token where trained, else -100), at most T + 1 long."""

    tokens: np.ndarray
    labels: np.ndarray
    truncated: bool


def encode_record(messages: list[Message], template: ChatTemplate, tokenizer: Tokenizer, length: int) -> Record:
    """Render and tokenize a conversation, cut to ``length`` tokens; :class:`BadLine` if nothing is left to learn.

    The messages are cut before they are tokenized, to the characters ``length + 1`` tokens can
    stand for at most: a 20 MB record costs what its first tokens cost, not gigabytes."""
    try:
        ids, trained = template.encode(tokenizer, _cut(messages, (length + 1) * tokenizer.max_token_bytes()))
    except ValueError as exc:
        raise BadLine("invalid messages", str(exc)) from None
    if not any(trained):
        raise BadLine("no assistant message")
    tokens = np.array(ids[:length], dtype=np.int64)
    labels = np.where(trained[:length], tokens, IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    if (labels == IGNORE_INDEX).all():
        raise BadLine("longer than the context", f"{len(ids)} tokens; no assistant token in the first {length}")
    return Record(tokens, labels, len(ids) > length)


def _cut(messages: list[Message], chars: int) -> list[Message]:
    """The messages with their content cut so that the rendered text holds its first ``chars``
    characters (and a little more: the markers are not counted). Every message stays, emptied past
    the cut, so a record too long to learn from is still reported as such."""
    sizes = [len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), str) else 0 for m in messages]
    if sum(sizes) <= chars:
        return messages
    out: list[Message] = []
    for m, size in zip(messages, sizes, strict=True):
        out.append({**m, "content": m["content"][: max(chars, 0)]} if size else m)  # a malformed one fails later
        chars -= size
    return out


@dataclass
class InstructionReport:
    """What reading the instruction data kept, cut and skipped, and how it was laid out."""

    records: int = 0
    truncated: int = 0
    blank_lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    layout: list[str] = field(default_factory=list)

    def bad(self, where: str, exc: BadLine, limit: int) -> None:
        """Count a bad record; past ``limit`` of them, stop with the first ones in the message."""
        self.skipped[exc.kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {exc}")
        if sum(self.skipped.values()) > limit:
            raise DataError(f"more than finetune.max_bad_records={limit} bad records; first: "
                            + "; ".join(self.examples))

    def summary(self) -> str:
        lines = [f"read {self.records:,} records ({self.truncated:,} cut to the context)"]
        lines += skipped_report(self.skipped, self.examples, self.blank_lines, "records")
        return "\n".join(lines + self.layout)


def read_records(
    paths: Sequence[str | Path], tokenizer: Tokenizer, length: int, max_bad: int
) -> tuple[list[Record], InstructionReport]:
    """Every good record of ``paths`` (in order) through the tokenizer's chat template, and the report."""
    template = ChatTemplate.of(tokenizer)
    report = InstructionReport()
    records: list[Record] = []
    if not paths:
        raise ConfigError("finetune needs instruction data: --data FILE.jsonl ... (finetune.data)")
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"finetune.data: {path} is not a file")
        blank = [0]
        for where, raw in numbered_lines(path, blank):
            try:
                records.append(encode_record(parse_record(raw), template, tokenizer, length))
            except BadLine as exc:
                report.bad(where, exc, max_bad)
        report.blank_lines += blank[0]
    if not records:
        raise DataError(f"no usable record in {', '.join(map(str, paths))}"
                        + (f"; first bad one: {report.examples[0]}" if report.examples else ""))
    report.records = len(records)
    report.truncated = sum(r.truncated for r in records)
    return records, report


# -- samples ---------------------------------------------------------------------------------------


def layout_samples(records: Sequence[Record], length: int, pack: bool, pad_id: int) -> np.ndarray:
    """Samples (N, 3 or 2, length): records packed back to back in order (a record that does not fit
    the rest of a row starts the next), or one per row; padding has label -100 and, packed, a
    document id of its own."""
    groups: list[list[Record]] = []
    used = length
    for record in records:
        if not pack or used + len(record.tokens) > length:
            groups.append([])
            used = 0
        groups[-1].append(record)
        used += len(record.tokens)
    samples = np.empty((len(groups), 3 if pack else 2, length), dtype=np.int64)
    samples[:, TOKENS], samples[:, LABELS] = pad_id, IGNORE_INDEX
    for row, group in zip(samples, groups, strict=True):
        start = 0
        for doc, record in enumerate(group):
            end = start + len(record.tokens)
            row[TOKENS, start:end], row[LABELS, start:end] = record.tokens, record.labels
            if pack:
                row[DOCUMENTS, start:end] = doc
            start = end
        if pack:
            row[DOCUMENTS, start:] = len(group)
    return samples


class InstructionDataset:
    """Samples in a fresh seeded order each epoch, for as many epochs as ``num_samples`` needs (at
    least one); with ``shuffle`` False, each sample once in order (validation)."""

    def __init__(self, samples: np.ndarray, num_samples: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        self.samples = samples
        n = len(samples)
        if not shuffle or n == 0:
            self.order = np.arange(n)
        else:
            rng = np.random.default_rng(seed)
            self.order = np.concatenate([rng.permutation(n) for _ in range(max(1, math.ceil(num_samples / n)))])

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.samples[self.order[i]]


def build_instruction_data(
    cfg: Config, tokenizer: Tokenizer, num_samples: int
) -> tuple[InstructionDataset, InstructionDataset, InstructionReport]:
    """Training and validation datasets of ``cfg.finetune.data``: the records shuffled by ``data.seed``,
    ``finetune.valid_fraction`` of them held out, each part laid out in samples of seq_len + 1."""
    fc, length = cfg.finetune, cfg.model.seq_len + 1
    records, report = read_records(fc.data, tokenizer, length, fc.max_bad_records)
    order = np.random.default_rng(cfg.data.seed).permutation(len(records))
    n_valid = min(max(round(fc.valid_fraction * len(records)), 1 if fc.valid_fraction > 0 else 0), len(records) - 1)
    parts = [[records[i] for i in order[n_valid:]], [records[i] for i in order[:n_valid]]]
    train, valid = (layout_samples(part, length, fc.pack, tokenizer.eod_id) for part in parts)
    for name, part, samples in (("training", parts[0], train), ("validation", parts[1], valid)):
        tokens = sum(len(r.tokens) for r in part)
        trained = sum(int((r.labels != IGNORE_INDEX).sum()) for r in part)
        fill = tokens / samples[:, TOKENS].size if len(samples) else 0.0
        report.layout.append(f"{name}: {len(part):,} records -> {len(samples):,} {'packed' if fc.pack else 'padded'} "
                             f"samples of {length} tokens ({fill:.0%} filled, {trained:,} trained tokens)")
    return InstructionDataset(train, num_samples, cfg.data.seed), InstructionDataset(valid, shuffle=False), report
