"""The data of ``mtnlg evaluate``: its JSONL formats, read with errors that name file and line, and few-shot prompts.

Formats (one JSON object a line; blank lines are skipped):

- ``perplexity``: ``{"text": "..."}`` (the key is ``--json-key``), each line one document scored on
  its own; a file that is not ``.jsonl``/``.json`` is one plain-text document; an indexed dataset
  (``PREFIX`` of ``PREFIX.bin``/``PREFIX.idx``) gives the documents of one split as token ids.
- ``cloze``: ``{"text": "passage ... word"}``, whose last space-separated word is the target and the
  rest the context (LAMBADA), or ``{"context": "...", "target": "word"}``.
- ``choice``: ``{"context": "...", "choices": ["...", "..."], "label": 1}`` (``label`` indexes ``choices``).

A target or choice is scored as the continuation ``" " + target`` of its context, the default target
delimiter of lm-evaluation-harness, so the same data gives the same numbers there.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mtnlg.data.gpt_dataset import split_ranges
from mtnlg.data.indexed import IndexedDataset, idx_path
from mtnlg.data.jsonl import read_objects

JSON_SUFFIXES = (".jsonl", ".json")
TASKS = ("perplexity", "cloze", "choice")
DELIMITER = " "  # between a context and its target or choice
SHOT_SEPARATOR = "\n\n"  # between the examples of a few-shot prompt, and before the item


@dataclass(frozen=True)
class Item:
    """One cloze or multiple-choice question: a context and its possible continuations (cloze: one)."""

    context: str
    choices: tuple[str, ...]
    label: int = 0

    @property
    def answer(self) -> str:
        return self.choices[self.label]

    def solved(self) -> str:
        """The item with its answer, as a few-shot example shows it."""
        return self.context + DELIMITER + self.answer


def _field(obj: dict, key: str, kind: type, where: str) -> object:
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r} (fields: {', '.join(obj) or 'none'})")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def cloze_item(obj: dict, where: str) -> Item:
    """A cloze item from ``{"text"}`` (split at the last space) or ``{"context", "target"}``."""
    if "text" in obj:
        context, _, target = str(_field(obj, "text", str, where)).strip().rpartition(DELIMITER)
    else:
        context, target = _field(obj, "context", str, where), _field(obj, "target", str, where)
    if not context or not str(target).strip():
        raise ValueError(f"{where}: a cloze item needs a context and a non-empty target word")
    return Item(str(context), (str(target),))


def choice_item(obj: dict, where: str) -> Item:
    """A multiple-choice item from ``{"context", "choices", "label"}``."""
    context = _field(obj, "context", str, where)
    choices = _field(obj, "choices", list, where)
    label = _field(obj, "label", int, where)
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
    if not 0 <= label < len(choices):
        raise ValueError(f"{where}: field 'label' is {label}, not an index of the {len(choices)} choices")
    return Item(str(context), tuple(choices), label)


def read_items(path: str | Path, task: str) -> list[Item]:
    """The cloze or choice items of a JSONL file."""
    parse = {"cloze": cloze_item, "choice": choice_item}[task]
    items = [parse(obj, where) for where, obj in read_objects(path)]
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def read_documents(path: str | Path, json_key: str = "text") -> list[str]:
    """The documents of a JSONL file (one a line, under ``json_key``) or a plain-text file (one)."""
    path = Path(path)
    if path.suffix not in JSON_SUFFIXES:
        return [path.read_text(encoding="utf-8")]
    docs = [str(_field(obj, json_key, str, where)) for where, obj in read_objects(path)]
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def is_indexed(path: str | Path) -> bool:
    """Whether ``path`` names an indexed dataset: a prefix with ``.bin``/``.idx`` files, or one of them."""
    text = str(path)
    return text.endswith((".bin", ".idx")) or idx_path(text).is_file()


def read_indexed_split(path: str | Path, split: str, name: str) -> list[np.ndarray]:
    """The token ids of each document of split ``name`` (train, valid or test) of an indexed dataset,
    with the documents divided as training divides them (``data.split``, e.g. ``949,50,1``)."""
    prefix = str(path).removesuffix(".bin").removesuffix(".idx")
    data = IndexedDataset(prefix)
    names = ("train", "valid", "test")
    if name not in names:
        raise ValueError(f"unknown split {name!r}; choose one of: {', '.join(names)}")
    start, end = split_ranges(split, data.num_documents)[names.index(name)]
    if start == end:
        raise ValueError(f"{prefix}: the {name} split of {split!r} has no documents (of {data.num_documents})")
    return [data.document(d) for d in range(start, end)]


def with_fewshot(items: Sequence[Item], pool: Sequence[Item], shots: int, seed: int) -> list[Item]:
    """Each item with ``shots`` solved examples drawn from ``pool`` before its context.

    An item's examples are drawn by a generator seeded from ``seed`` and the item's context, so a
    prompt does not depend on the other items or their order; an example equal to the item itself
    is never drawn (the pool may be the evaluation file)."""
    if shots == 0:
        return list(items)
    out = []
    for item in items:
        candidates = [example for example in pool if example != item]
        if len(candidates) < shots:
            raise ValueError(f"{shots} shots need {shots} few-shot examples other than the item; "
                             f"the few-shot data has {len(candidates)}")
        examples = random.Random(f"{seed}:{item.context}").sample(candidates, shots)
        prefix = SHOT_SEPARATOR.join(example.solved() for example in examples)
        out.append(replace(item, context=prefix + SHOT_SEPARATOR + item.context))
    return out
