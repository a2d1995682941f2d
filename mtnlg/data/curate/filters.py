"""The per-document steps of curation: language ID, decontamination and PII redaction.

Each is a datatrove step that counts what it did with ``stat_update`` (the stats JSON sums them
over tasks). Language ID uses py3langid, whose model ships inside its wheel: nothing is
downloaded at run time (datatrove's own ``LanguageFilter`` fetches a fastText model on first use).
datatrove's n-gram decontamination reads its tasks through lighteval, so mtnlg's reads the JSONL
files ``mtnlg evaluate`` reads. PII uses datatrove's ``PIIReplacer`` with its e-mail and IP
patterns and two more (phone numbers, Luhn-checked card numbers); every match becomes a
placeholder naming its kind, and nothing else in the text changes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.formatters.pii import PIIReplacer, public_ip_validator

from mtnlg.data.jsonl import read_objects

_WORD = re.compile(r"\w+")


class LanguageID(PipelineStep):
    """Keeps documents whose most likely language is one of ``languages`` with probability at least
    ``min_score`` (py3langid, normalised probabilities); counts every language seen."""

    type = "mtnlg"
    name = "language ID (py3langid)"

    def __init__(self, languages: Iterable[str], min_score: float = 0.5) -> None:
        super().__init__()
        self.languages, self.min_score = frozenset(languages), min_score
        self._identifier = None

    def classify(self, text: str) -> tuple[str, float]:
        if self._identifier is None:
            from py3langid.langid import _load_identifier

            self._identifier = _load_identifier(norm_probs=True)  # the model file inside the wheel
        lang, score = self._identifier.classify(text.replace("\n", " "))
        return str(lang), float(score)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                lang, score = self.classify(doc.text)
                self.stat_update(f"language {lang}")
                keep = lang in self.languages and score >= self.min_score
            if keep:
                yield doc
            else:
                self.stat_update("removed: language")


def ngram_hashes(text: str, n: int) -> set[int]:
    """64-bit hashes of the lowercase word n-grams of ``text`` (none for a text shorter than ``n`` words)."""
    words = _WORD.findall(text.lower())
    return {int.from_bytes(hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest(), "little")
            for i in range(len(words) - n + 1)}


def item_texts(obj: dict) -> list[str]:
    """The texts of one evaluation item in any of ``mtnlg evaluate``'s formats: ``text`` (perplexity,
    cloze), ``context`` + ``target`` (cloze), ``context`` + each of ``choices`` (choice)."""
    texts = [obj["text"]] if isinstance(obj.get("text"), str) else []
    context = obj.get("context") if isinstance(obj.get("context"), str) else ""
    endings = [obj["target"]] if isinstance(obj.get("target"), str) else []
    endings += [c for c in obj.get("choices", []) if isinstance(c, str)] if isinstance(obj.get("choices"), list) else []
    texts += [f"{context} {e}" for e in endings] or ([context] if context else [])
    return texts


def task_ngrams(paths: Iterable[str | Path], n: int) -> tuple[dict[str, set[int]], dict[str, int]]:
    """Per task file (named by its stem): the n-gram hashes of its items, and how many items are
    shorter than ``n`` words (they cannot be checked and are reported)."""
    grams: dict[str, set[int]] = {}
    short: dict[str, int] = {}
    for path in paths:
        name = Path(path).stem
        grams[name], short[name] = set(), 0
        for _, obj in read_objects(path):
            found = set().union(*(ngram_hashes(t, n) for t in item_texts(obj))) if item_texts(obj) else set()
            grams[name] |= found
            short[name] += not found
    return grams, short


class Decontaminate(PipelineStep):
    """Removes (or with ``report_only`` only counts) documents sharing an ``n``-gram with any item of
    the evaluation tasks; counts contaminated documents and overlapping n-grams per task."""

    type = "mtnlg"
    name = "decontamination"

    def __init__(self, task_files: list[str], n: int = 13, report_only: bool = False) -> None:
        super().__init__()
        self.task_files, self.n, self.report_only = task_files, n, report_only
        self._grams: dict[str, set[int]] | None = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self._grams is None:
            self._grams, short = task_ngrams(self.task_files, self.n)
            if rank == 0:
                for task, count in short.items():
                    self.stat_update(f"{task}: items shorter than {self.n} words", value=count)
        for doc in data:
            with self.track_time():
                mine = ngram_hashes(doc.text, self.n)
                hits = {task: len(mine & grams) for task, grams in self._grams.items()}
                hits = {task: h for task, h in hits.items() if h}
                for task, h in hits.items():
                    self.stat_update(f"{task}: contaminated documents")
                    self.stat_update(f"{task}: overlapping {self.n}-grams", value=h)
            if hits and not self.report_only:
                self.stat_update("removed: contamination")
                continue
            yield doc


def luhn_valid(number: str) -> bool:
    """Whether the digits of ``number`` (13 to 19 of them) pass the Luhn checksum of card numbers."""
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = sum(d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d) for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


CARD = r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"
# Not inside a longer run of digit groups (a card number that failed Luhn stays as it is).
PHONE = (r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
         r"(?![\w-]|[ .-]\d)")
PLACEHOLDERS = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "card_number": "<CARD_NUMBER>",
                "phone": "<PHONE>"}


class RedactPII(PipelineStep):
    """Replaces e-mail addresses, public IP addresses, Luhn-valid card numbers and phone numbers by
    ``<EMAIL>``, ``<IP_ADDRESS>``, ``<CARD_NUMBER>``, ``<PHONE>`` (cards before phones: a card number
    would otherwise read as a phone); counts each kind."""

    type = "mtnlg"
    name = "PII redaction"

    def __init__(self) -> None:
        super().__init__()
        patterns = PIIFormatter()  # datatrove's e-mail and IP patterns
        self.kinds = {
            "email": (patterns.emails_replacer.regex.pattern, None),
            "ip_address": (patterns.ip_replacer.regex.pattern, partial(public_ip_validator, public_only=True)),
            "card_number": (CARD, luhn_valid),
            "phone": (PHONE, None),
        }
        self._replacers: dict[str, PIIReplacer] | None = None

    def _counting(self, kind: str, check):  # noqa: ANN001, ANN202
        def validator(match: str) -> bool:
            ok = check is None or check(match)
            if ok:
                self.stat_update(f"pii {kind}")
            return ok
        return validator

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self._replacers is None:  # built in the task: the counting validators close over this step
            self._replacers = {kind: PIIReplacer(regex, PLACEHOLDERS[kind], self._counting(kind, check))
                               for kind, (regex, check) in self.kinds.items()}
        for doc in data:
            with self.track_time():
                for replacer in self._replacers.values():
                    doc.text = replacer.replace(doc.text)
            yield doc
