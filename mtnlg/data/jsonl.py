"""JSON Lines, the input format of preprocessing, dedup, fine-tuning and evaluation: one reader.

Each line is read as bytes and numbered, so every problem is reported as ``file:line: why``;
what a bad line costs is the caller's choice: preprocess, dedup and fine-tuning count it
(``BadLine`` kinds, summarised by ``skipped_report``), evaluation stops at it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

MAX_EXAMPLES = 10  # bad lines quoted in a summary


def numbered_lines(path: str | Path, blank: list[int] | None = None) -> Iterator[tuple[str, bytes]]:
    """``(file:line, raw bytes)`` for each non-blank line of ``path``; ``blank[0]`` counts the blank ones."""
    path = Path(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                if blank is not None:
                    blank[0] += 1
                continue
            yield f"{path}:{number}", raw


class BadLine(ValueError):
    """One input line cannot become a document; ``kind`` is the category counted in reports."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind = kind


def parse_json_object(raw: bytes) -> dict:
    """The JSON object of one JSONL line, or :class:`BadLine` saying why it is not one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine("invalid UTF-8", f"byte {exc.start}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadLine("malformed JSON", f"{exc.msg.removesuffix(' at')} at column {exc.colno}") from None
    except RecursionError:  # Python's parser recurses once per level: 100k nested lists end it
        raise BadLine("malformed JSON", "nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadLine("not a JSON object", type(obj).__name__)
    if _SURROGATE_ESCAPE.search(raw) is not None:  # only then is the (costlier) check needed
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            lone = f"{exc.object[exc.start]!a}"
            raise BadLine("invalid Unicode", f"an unpaired UTF-16 surrogate escape ({lone})") from None
        except RecursionError:
            raise BadLine("malformed JSON", "nested too deeply") from None
    return obj


# A \uD800-\uDFFF escape: JSON can write half of a UTF-16 pair alone, which is no text at all
# (neither UTF-8 nor the tokenizer can hold it).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json_line(raw: bytes, json_key: str) -> str:
    """The document text of one JSONL line, or :class:`BadLine` saying why there is none."""
    return parse_json_record(raw, json_key)[1]


def parse_json_record(raw: bytes, json_key: str) -> tuple[dict, str]:
    """The object of one JSONL line and its document text (the record's other fields travel with it)."""
    obj = parse_json_object(raw)
    if json_key not in obj:
        raise BadLine(f"missing key {json_key!r}", f"keys: {', '.join(list(obj)[:5])}")
    text = obj[json_key]
    if not isinstance(text, str):
        raise BadLine(f"{json_key!r} is not a string", type(text).__name__)
    if not text.strip():
        raise BadLine("empty document")
    return obj, text


def read_objects(path: str | Path) -> Iterator[tuple[str, dict]]:
    """``(file:line, object)`` for each non-blank line; the first bad line is a ValueError naming it."""
    for where, raw in numbered_lines(path):
        try:
            yield where, parse_json_object(raw)
        except BadLine as exc:
            raise ValueError(f"{where}: {exc}") from None


def skipped_report(skipped: Counter, examples: list[str], blank_lines: int, unit: str) -> list[str]:
    """The lines of a summary that say what input was skipped and why (preprocess, finetune)."""
    lines = []
    if skipped:
        kinds = ", ".join(f"{k}: {v}" for k, v in skipped.most_common())
        lines.append(f"skipped {sum(skipped.values())} {unit} ({kinds}); first ones:")
        lines += [f"  {e}" for e in examples]
    if blank_lines:
        lines.append(f"ignored {blank_lines} blank lines")
    return lines
