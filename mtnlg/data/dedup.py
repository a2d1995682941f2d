"""Exact and near-duplicate removal (MinHash + LSH) and simple quality filters for JSONL corpora.

MT-NLG removed documents whose Jaccard similarity with a kept one exceeded 0.8. The Jaccard
similarity of two documents is ``|A & B| / |A | B|`` over their sets of word n-grams ("shingles").
MinHash estimates it without comparing sets: for a random hash function ``h``,
``P[min h(A) == min h(B)] = J(A, B)``, so the fraction of equal entries in two signatures of
``num_perm`` such minima estimates ``J``. Locality-sensitive hashing finds the candidates without
comparing every pair: the signature is cut into ``bands`` of ``rows`` values and two documents
become candidates when any band matches exactly, which happens with probability
``1 - (1 - J^rows)^bands`` -- a steep S-curve placed at the threshold. Candidates are then confirmed
with the full signature. Documents are processed in order and the first of a duplicate group is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtnlg.data.jsonl import BadLine, parse_json_line
from mtnlg.util.fs import atomic_file, write_text

_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) for combining word hashes
EXAMPLES_PER_REASON = 3


@dataclass
class DedupConfig:
    """Which duplicates and low-quality documents to remove."""

    threshold: float = 0.8  # Jaccard similarity above which a document is a near-duplicate
    num_perm: int = 128  # MinHash signature length (more is more precise and slower)
    ngram: int = 5  # words per shingle
    min_chars: int = 0  # drop documents shorter than this (after stripping whitespace)
    max_symbol_ratio: float = 1.0  # drop documents whose non-space characters are mostly not letters/digits
    exact: bool = True
    near: bool = True
    seed: int = 1

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2 or self.ngram < 1 or self.min_chars < 0:
            raise ValueError("num_perm must be >= 2, ngram >= 1 and min_chars >= 0")
        if not 0.0 <= self.max_symbol_ratio <= 1.0:
            raise ValueError(f"max_symbol_ratio must be in [0, 1], got {self.max_symbol_ratio}")


def lsh_params(threshold: float, num_perm: int, false_positive_weight: float = 0.1) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising weighted false positives + false negatives.

    A pair of similarity ``s`` collides in some band with probability ``p(s) = 1 - (1 - s^r)^b``;
    the false-positive mass is the integral of ``p`` below the threshold, the false-negative mass
    the integral of ``1 - p`` above it. Candidates are confirmed with the full signature, so a false
    positive costs one comparison while a false negative keeps a duplicate: misses weigh 9x more.
    """
    s = (np.arange(1000) + 0.5) / 1000  # midpoint rule on [0, 1]
    below = s < threshold
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            err = false_positive_weight * p[below].sum() + (1 - false_positive_weight) * (1.0 - p[~below]).sum()
            if err < best_err:
                best, best_err = (b, r), err
    return best


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """64-bit hashes of the lowercase word n-grams of ``text`` (the whole text if it is shorter)."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    h = np.array([zlib.crc32(w.encode()) for w in words], dtype=np.uint64)
    n = min(ngram, h.size)
    combined = np.zeros(h.size - n + 1, dtype=np.uint64)
    for j in range(n):  # polynomial combination of the n word hashes, mod 2^64 (numpy wraps)
        combined = combined * _MIX + h[j : h.size - n + 1 + j]
    return np.unique(mix64(combined))


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 whose output bits all depend on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class MinHasher:
    """Signatures under ``num_perm`` hash functions ``h_k(x) = mix64(x XOR s_k)`` with random seeds ``s_k``.

    A strongly mixing hash matters: the textbook ``(a x + b) mod p`` with small ``a`` is nearly monotone
    in ``x``, so all its "permutations" pick the same minimum and the estimate collapses.
    """

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.seeds = rng.integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64, endpoint=True)[:, None]
        self.ngram = ngram

    def signature(self, text: str) -> np.ndarray | None:
        """uint32 signature (the high bits of each minimum), or None for a text without words."""
        x = shingle_hashes(text, self.ngram)
        if x.size == 0:
            return None
        sig = np.full(self.seeds.shape[0], np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, x.size, 4096):  # bounded (num_perm x 4096) temporaries for long documents
            block = mix64(self.seeds ^ x[None, start : start + 4096])
            np.minimum(sig, block.min(axis=1), out=sig)
        return (sig >> np.uint64(32)).astype(np.uint32)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


class LSHIndex:
    """Buckets of band hashes -> ids of the kept documents whose signature has that band."""

    def __init__(self, bands: int, rows: int) -> None:
        self.bands, self.rows = bands, rows
        self.buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
        self.signatures: dict[int, np.ndarray] = {}

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def best_match(self, sig: np.ndarray) -> tuple[int, float] | None:
        """The indexed document most similar to ``sig`` among the LSH candidates, with its estimate."""
        keys = self._keys(sig)
        candidates = {doc for band, key in zip(self.buckets, keys, strict=True) for doc in band.get(key, ())}
        scored = [(estimated_jaccard(sig, self.signatures[c]), c) for c in sorted(candidates)]
        if not scored:
            return None
        score, doc = max(scored)
        return doc, score

    def add(self, doc: int, sig: np.ndarray) -> None:
        self.signatures[doc] = sig
        for band, key in zip(self.buckets, self._keys(sig), strict=True):
            band[key].append(doc)


def symbol_ratio(text: str) -> float:
    """Fraction of non-whitespace characters that are neither letters nor digits."""
    chars = [c for c in text if not c.isspace()]
    return sum(not c.isalnum() for c in chars) / len(chars) if chars else 1.0


@dataclass
class DedupReport:
    """What a dedup run read, kept and removed, and why."""

    input: str
    output: str
    bands: int = 0
    rows: int = 0
    read: int = 0
    kept: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def note(self, reason: str, example: str) -> None:
        """Count a removal; keep its example if fewer than 3 of this reason are shown yet."""
        self.removed[reason] += 1
        if self.removed[reason] <= EXAMPLES_PER_REASON:
            self.examples.append(example)

    def to_dict(self) -> dict:
        return {**self.__dict__, "removed": dict(self.removed)}

    def summary(self) -> str:
        lines = [
            f"read {self.read:,} lines from {self.input}, kept {self.kept:,} documents -> {self.output} "
            f"in {self.seconds:.1f} s (LSH {self.bands} bands x {self.rows} rows)"
        ]
        lines += [f"removed {n:,}: {reason}" for reason, n in self.removed.most_common()]
        lines += [f"  {e}" for e in self.examples]
        return "\n".join(lines)


def _filter_reason(text: str, cfg: DedupConfig) -> str | None:
    if len(text.strip()) < cfg.min_chars:
        return f"shorter than {cfg.min_chars} characters"
    if cfg.max_symbol_ratio < 1.0 and symbol_ratio(text) > cfg.max_symbol_ratio:
        return f"symbol ratio above {cfg.max_symbol_ratio}"
    return None


class _Deduplicator:
    """The per-document decision, in input order; keeps the state of what was kept so far."""

    def __init__(self, cfg: DedupConfig, report: DedupReport) -> None:
        self.cfg, self.report = cfg, report
        self.report.bands, self.report.rows = lsh_params(cfg.threshold, cfg.num_perm)
        self.hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.seed)
        self.index = LSHIndex(self.report.bands, self.report.rows)
        self.seen: dict[bytes, int] = {}

    def keep(self, text: str, where: str, line: int) -> bool:
        reason = _filter_reason(text, self.cfg)
        if reason:
            self.report.note(reason, f"{where}:{line}: {reason}")
            return False
        digest = hashlib.blake2b(text.strip().encode(), digest_size=16).digest()
        if self.cfg.exact and digest in self.seen:
            self.report.note("exact duplicate", f"{where}:{line}: exact duplicate of line {self.seen[digest]}")
            return False
        sig = self.hasher.signature(text) if self.cfg.near else None
        if sig is not None:
            match = self.index.best_match(sig)
            if match is not None and match[1] >= self.cfg.threshold:
                self.report.note(
                    "near duplicate",
                    f"{where}:{line}: near duplicate of line {match[0]} (estimated Jaccard {match[1]:.2f})",
                )
                return False
            self.index.add(line, sig)
        self.seen[digest] = line
        return True


def dedup_jsonl(
    input_path: str | Path, output_path: str | Path, cfg: DedupConfig | None = None, json_key: str = "text"
) -> DedupReport:
    """Copy the kept lines of ``input_path`` (unchanged, other keys included) to ``output_path``.

    Bad lines (see :func:`mtnlg.data.preprocess.parse_json_line`) are dropped and reported.
    The output is written under a temporary name and renamed when complete.
    """
    cfg = cfg or DedupConfig()
    cfg.validate()
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input not found: {input_path}")
    report = DedupReport(str(input_path), str(output_path))
    dedup = _Deduplicator(cfg, report)
    start = time.perf_counter()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(input_path, "rb") as src, atomic_file(output_path, "wb") as dst:
        for number, raw in enumerate(src, start=1):
            if not raw.strip():
                continue
            report.read += 1
            try:
                text = parse_json_line(raw, json_key)
            except BadLine as exc:
                report.note(f"bad line: {exc.kind}", f"{input_path}:{number}: {exc}")
                continue
            if dedup.keep(text, str(input_path), number):
                dst.write(raw if raw.endswith(b"\n") else raw + b"\n")
                report.kept += 1
    report.seconds = time.perf_counter() - start
    return report


def write_report(report: DedupReport, path: str | Path) -> None:
    write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
