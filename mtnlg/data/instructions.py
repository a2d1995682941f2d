"""A synthetic instruction set: small word tasks whose answers can be checked exactly.

Each record asks for one transformation of a few words, e.g. ``reverse: cat dog sun`` ->
``sun dog cat`` or ``uppercase: cat dog`` -> ``CAT DOG``. A small model learns these in minutes on a
CPU, which makes them the fine-tuning demo and the test that fine-tuning teaches what it should:
an answer to an item never seen in training is right or wrong, with no judgement involved.
Records alternate between the two formats ``mtnlg finetune`` reads (prompt/completion and chat
messages), so both are exercised.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from mtnlg.util.fs import write_text

TASKS: dict[str, Callable[[list[str]], str]] = {
    "reverse": lambda words: " ".join(reversed(words)),
    "uppercase": lambda words: " ".join(words).upper(),
}

# Common words that are single tokens of small BPEs trained on English (and on the default corpus).
DEFAULT_WORDS = ("list", "file", "value", "name", "string", "object", "module", "class", "type", "function",
                 "data", "line", "error", "number", "path", "time")


def instruction_items(
    n: int,
    words: Sequence[str] = DEFAULT_WORDS,
    lengths: tuple[int, int] = (2, 4),
    seed: int = 0,
    exclude: Collection[str] = (),
) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) pairs over ``words`` (``lengths``: fewest and most words of an
    item), none of whose prompts is in ``exclude`` (the held-out ones)."""
    rng = random.Random(seed)
    items: dict[str, str] = {}
    excluded = set(exclude)
    tasks = sorted(TASKS)
    for _ in range(100 * n):
        if len(items) == n:
            break
        task = tasks[len(items) % len(tasks)]
        chosen = [rng.choice(words) for _ in range(rng.randint(*lengths))]
        prompt = f"{task}: {' '.join(chosen)}"
        if prompt not in excluded:
            items.setdefault(prompt, TASKS[task](chosen))
    if len(items) < n:
        raise ValueError(f"only {len(items)} distinct items can be drawn from {len(words)} words of {lengths} words")
    return list(items.items())


def as_record(prompt: str, answer: str, chat: bool) -> dict:
    """A ``mtnlg finetune`` record: chat messages, or prompt and completion."""
    if chat:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    return {"prompt": prompt, "completion": answer}


def write_instructions(path: str | Path, items: Sequence[tuple[str, str]]) -> Path:
    """Write ``items`` as JSONL records, alternating the two formats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(as_record(prompt, answer, chat=i % 2 == 1)) for i, (prompt, answer) in enumerate(items)]
    write_text(path, "\n".join(lines) + "\n")
    return path
