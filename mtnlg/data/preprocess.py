"""Tokenize JSONL or text into a Megatron-compatible ``.bin``/``.idx`` dataset, streaming, in parallel.

The main process reads the input in chunks of about 256 KB of lines and hands them to worker
processes, keeping at most two chunks per worker in flight, so memory stays bounded whatever the
input size (holding the whole input is how Megatron's preprocessing runs out of memory). Results
come back in input order and are appended to the ``.bin`` file as they arrive; the ``.idx`` is
written at the end and both files are renamed into place only when complete.

Input: ``.jsonl``/``.json`` files hold one JSON object per line with the text under ``json_key``;
any other file is plain text and is one document. Each document gets the end-of-document token
appended. Bad lines (invalid UTF-8, malformed JSON, not an object, missing key, non-string value,
empty text) are counted and the first few reported as ``file:line: reason``; ``strict`` makes the
first one an error instead. Blank lines in JSONL are tolerated and counted separately.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtnlg.data.indexed import DataError, IndexedDatasetWriter, token_dtype
from mtnlg.data.jsonl import MAX_EXAMPLES, BadLine, parse_json_line, skipped_report
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.util.memory import return_freed_memory

CHUNK_BYTES = 1 << 18
JSON_SUFFIXES = (".jsonl", ".json")


def parse_text_file(raw: bytes) -> str:
    """A plain-text file as one document."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine("invalid UTF-8", f"byte {exc.start}") from None
    if not text.strip():
        raise BadLine("empty document")
    return text


@dataclass
class Chunk:
    """Consecutive raw lines of one file (or a whole text file), starting at line ``first_line``."""

    path: str
    first_line: int
    lines: list[bytes]
    is_json: bool
    nbytes: int


@dataclass
class Encoded:
    """A chunk's documents as one token array plus lengths, and its bad lines as (line, BadLine)."""

    tokens: np.ndarray
    lengths: np.ndarray
    bad: list[tuple[str, int, BadLine]]
    blank: int
    nbytes: int


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expand to their ``.jsonl``/``.json``/``.txt``/``.md`` files, sorted."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in JSON_SUFFIXES + (".txt", ".md"))
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    if not paths:
        raise FileNotFoundError(f"no input files in {[str(i) for i in inputs]}")
    return paths


def iter_chunks(paths: list[Path], chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """Stream the inputs as chunks of about ``chunk_bytes`` (never reading a whole JSONL file)."""
    for path in paths:
        if path.suffix not in JSON_SUFFIXES:
            raw = path.read_bytes()
            yield Chunk(str(path), 1, [raw], False, len(raw))
            continue
        with open(path, "rb") as f:
            lines: list[bytes] = []
            first, size = 1, 0
            for number, line in enumerate(f, start=1):
                lines.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    yield Chunk(str(path), first, lines, True, size)
                    lines, first, size = [], number + 1, 0
            if lines:
                yield Chunk(str(path), first, lines, True, size)


class Encoder:
    """Turns chunks into token arrays (one per process; single-threaded ``encode`` per document)."""

    def __init__(self, tokenizer_json: str, json_key: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tokenizer = Tokenizer(HFTokenizer.from_str(tokenizer_json))
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.json_key = json_key

    def __call__(self, chunk: Chunk) -> Encoded:
        docs: list[list[int]] = []
        bad: list[tuple[str, int, BadLine]] = []
        blank = 0
        eod = self.tokenizer.eod_id
        for number, raw in enumerate(chunk.lines, start=chunk.first_line):
            if chunk.is_json and not raw.strip():
                blank += 1
                continue
            try:
                text = parse_json_line(raw, self.json_key) if chunk.is_json else parse_text_file(raw)
            except BadLine as exc:
                bad.append((chunk.path, number, exc))
                continue
            ids = self.tokenizer.encode(text)
            ids.append(eod)
            docs.append(ids)
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))
        return Encoded(tokens, lengths, bad, blank, chunk.nbytes)


_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer_json: str, json_key: str) -> None:
    global _WORKER_ENCODER
    return_freed_memory()  # a spawned worker does not inherit the parent's allocator setting
    _WORKER_ENCODER = Encoder(tokenizer_json, json_key)


def _encode_in_worker(chunk: Chunk) -> Encoded:
    assert _WORKER_ENCODER is not None, "worker initializer did not run"
    return _WORKER_ENCODER(chunk)


def _ordered_map(fn: Callable[[Chunk], Encoded], items: Iterator[Chunk], pool: ProcessPoolExecutor,
                 window: int) -> Iterator[Encoded]:
    """``map`` in input order with at most ``window`` items in flight (``pool.map`` reads all input first)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass
class PreprocessReport:
    """What a preprocessing run read, wrote and skipped."""

    output_prefix: str
    dtype: str = ""
    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    blank_lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, enc: Encoded) -> None:
        self.documents += int(enc.lengths.size)
        self.tokens += int(enc.tokens.size)
        self.bytes_read += enc.nbytes
        self.blank_lines += enc.blank
        for path, line, exc in enc.bad:
            self.skipped[exc.kind] += 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{path}:{line}: {exc}")

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"wrote {self.output_prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}) "
            f"from {self.bytes_read / 1e6:.1f} MB in {self.seconds:.1f} s ({rate:,.0f} tokens/s)"
        ]
        return "\n".join(lines + skipped_report(self.skipped, self.examples, self.blank_lines, "lines"))


def preprocess(
    inputs: Iterable[str | Path],
    tokenizer: Tokenizer | str | Path,
    output_prefix: str | Path,
    workers: int = 1,
    json_key: str = "text",
    strict: bool = False,
    progress: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> PreprocessReport:
    """Tokenize ``inputs`` into ``output_prefix.bin``/``.idx``; returns the report (see module doc).

    ``chunk_bytes`` is the unit of work sent to a worker: memory holds about ``2 * workers`` of them.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _check_prefix(output_prefix)
    paths = expand_inputs(inputs)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    tok_json = tok.hf.to_str()
    report = PreprocessReport(str(output_prefix), dtype=str(token_dtype(tok.vocab_size)))
    start = time.perf_counter()
    total = sum(p.stat().st_size for p in paths)
    with ExitStack() as stack:
        writer = stack.enter_context(IndexedDatasetWriter(output_prefix, token_dtype(tok.vocab_size)))
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not progress))
        chunks = iter_chunks(paths, chunk_bytes)
        encoded = stack.enter_context(closing(_encoded_chunks(chunks, tok_json, json_key, workers)))
        for enc in encoded:
            if strict and enc.bad:
                path, line, exc = enc.bad[0]
                raise DataError(f"{path}:{line}: {exc} (run without --strict to skip and count bad lines)")
            writer.add_documents(enc.tokens, enc.lengths)
            report.add(enc)
            elapsed = time.perf_counter() - start
            bar.update(enc.nbytes)
            bar.set_postfix_str(f"{report.documents / elapsed:,.0f} docs/s, {report.tokens / elapsed:,.0f} tok/s")
        if report.documents == 0:  # raised before finalize: nothing is written
            raise DataError(_nothing_survived(report, len(paths)))
        writer.finalize()
    report.seconds = time.perf_counter() - start
    return report


def _check_prefix(output_prefix: str | Path) -> None:
    """A prefix names files (PREFIX.bin, PREFIX.idx); one that names a directory would write the
    hidden files ``dir/.bin`` and ``dir/.idx``."""
    text = str(output_prefix)
    path = Path(text)
    if not text or text.endswith(("/", os.sep)) or path.is_dir() or path.name in ("", ".", ".."):
        raise DataError(f"output prefix {text!r} names a directory; give a file name prefix in it, "
                        f"e.g. {str(path / 'data')!r} (writes data.bin and data.idx)")


def _nothing_survived(report: PreprocessReport, files: int) -> str:
    """Why a run produced no document, in one line (and that nothing was written)."""
    where = f"{files} input file{'s' if files != 1 else ''}, {report.bytes_read:,} bytes"
    if report.skipped:
        kinds = ", ".join(f"{k}: {v}" for k, v in report.skipped.most_common())
        why = f"every line was bad ({kinds}); first: {report.examples[0]}"
    elif report.blank_lines:
        why = f"the input has only blank lines ({report.blank_lines})"
    else:
        why = "the input is empty"
    return f"no document to write from {where}: {why}; nothing was written"


def _encoded_chunks(chunks: Iterator[Chunk], tok_json: str, json_key: str, workers: int) -> Iterator[Encoded]:
    if workers == 1:
        yield from map(Encoder(tok_json, json_key), chunks)
        return
    # fork where the OS has it: a spawned worker would re-import the package (and torch, ~2 s each).
    # The children only run single-threaded tokenization, so threads in the parent cannot deadlock them.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=(tok_json, json_key)) as pool:
        yield from _ordered_map(_encode_in_worker, chunks, pool, 2 * workers)
