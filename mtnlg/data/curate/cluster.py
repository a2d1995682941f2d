"""Fuzzy and exact duplicates from MinHash LSH candidates, in bounded memory per task.

datatrove computes the signatures (one task per input shard) and the candidate pairs: documents
whose signatures agree on a whole band, one task per band over that band's sorted signature
files (``MinhashDedupBuckets``). This module adds what datatrove leaves out and mtnlg needs:

* each candidate pair is confirmed with the full signature (the fraction of equal MinHash values
  estimates the Jaccard similarity), so a pair that merely shares one band is not a duplicate. The
  estimate of ``m`` values has a standard error of ``sqrt(t (1 - t) / m)`` at similarity ``t``, so
  a pair counts when its estimate reaches the threshold less two of them (0.73 for 0.8 at 126
  values): a pair just above the threshold is then found 97.5% of the time, and one at 0.6 is
  removed with probability 0.2%;
* the clusters (connected components of the confirmed pairs) keep their *first* document in the
  order of the inputs as given (file, then line), whatever the number of shards, tasks or
  workers; datatrove's own clustering keeps a union-by-size root, which depends on the task layout;
* a removed document whose text equals the kept one's is counted as an exact duplicate.

Memory: the signatures of two tasks at a time, the pairs (a few per duplicate document), and the
order keys of the documents in pairs (the key files are memory-mapped).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

from mtnlg.data.curate.records import FILE_BITS, order_key
from mtnlg.util.fs import atomic_file, write_text

EXAMPLES = 5


def confirm_level(threshold: float, values: int) -> float:
    """The least estimated Jaccard of a confirmed pair: the threshold less two standard errors."""
    return threshold - 2.0 * math.sqrt(threshold * (1.0 - threshold) / values)


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest false candidates) for which a pair exactly at
    ``threshold`` still becomes a candidate with probability ``recall`` (``1 - (1 - t^r)^b``)."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


class Signatures(MinhashDedupSignature):
    """datatrove's MinHash signature step, always into fresh files. datatrove (0.10.1) reuses the
    signature files it finds non-empty, and the unclosed files of a task that died mid-shard in this
    process flush their buffers whenever they are collected, into the rerun's file if it reuses the
    inode (the bucket stage then found it out of order). mtnlg's completion markers already skip
    finished tasks, so a task that runs removes its old files first and never keeps them."""

    def check_can_skip_sig_writing(self, rank: int) -> tuple[bool, int | None]:
        return False, None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):  # noqa: ANN201
        for band in range(self.config.num_buckets):
            path = f"bucket_{band:03d}/{rank:05d}.minhash.sig"
            if self.output_folder.exists(path):
                self.output_folder.rm(path)  # a stale writer now flushes into the unlinked file
        return super().run(data, rank, world_size)


class OrderKeys(PipelineStep):
    """Records, per task, each document's order key and text digest, in the order the MinHash
    signature step after it numbers the documents (``KEYS/RANK.npy``: rows of (key, digest))."""

    type = "mtnlg"
    name = "order keys"

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        rows: list[tuple[int, int]] = []
        for doc in data:
            with self.track_time():
                digest = hashlib.blake2b(doc.text.strip().encode(), digest_size=8).digest()
                rows.append((order_key(doc.id), int.from_bytes(digest, "little") >> 1))
            yield doc
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        with atomic_file(Path(self.folder) / f"{rank:05d}.npy", "wb") as f:
            np.save(f, np.array(rows, dtype=np.int64).reshape(-1, 2))


def read_signatures(folder: Path, rank: int, bands: int, rows: int, count: int) -> np.ndarray:
    """(count, bands * rows) uint32: the full MinHash signature of each document of one task."""
    record = np.dtype([("h", "<u4", (rows,)), ("doc", "<u4")])
    sigs = np.full((count, bands * rows), np.iinfo(np.uint32).max, dtype=np.uint32)
    for band in range(bands):
        path = folder / f"bucket_{band:03d}" / f"{rank:05d}.minhash.sig"
        recs = np.fromfile(path, dtype=record) if path.is_file() else np.zeros(0, record)
        sigs[recs["doc"], band * rows:(band + 1) * rows] = recs["h"]
    return sigs


def read_pairs(folder: Path) -> np.ndarray:
    """Unique candidate pairs (task a, doc a, task b, doc b) of every band, as uint32 rows."""
    parts = [np.fromfile(p, dtype="<u4").reshape(-1, 4) for p in sorted(folder.glob("*.dups"))]
    pairs = np.concatenate(parts) if parts else np.zeros((0, 4), np.uint32)
    return np.unique(pairs, axis=0)


def components(edges: np.ndarray, count: int) -> np.ndarray:
    """The smallest node of each node's connected component (min-label propagation)."""
    label = np.arange(count)
    while True:
        low = np.minimum(label[edges[:, 0]], label[edges[:, 1]])
        new = label.copy()
        np.minimum.at(new, edges[:, 0], low)
        np.minimum.at(new, edges[:, 1], low)
        new = new[new]  # jump to the label's label: halves the remaining path each round
        if np.array_equal(new, label):
            return label
        label = new


class Cluster(PipelineStep):
    """One task: confirm the candidates, cluster them, write each task's sorted ``RANK.remove`` list
    (datatrove's ``MinhashDedupFilter`` reads it) and ``clusters.json`` (counts and examples)."""

    type = "mtnlg"
    name = "duplicate clusters"

    def __init__(self, work: str, tasks: int, bands: int, rows: int, threshold: float, inputs: list[str]) -> None:
        super().__init__()
        self.work, self.tasks, self.bands, self.rows = Path(work), tasks, bands, rows
        self.threshold, self.inputs = threshold, inputs

    def confirmed(self, pairs: np.ndarray, keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The pairs whose estimated Jaccard reaches the threshold, and that estimate."""
        keep, score = np.zeros(len(pairs), bool), np.zeros(len(pairs))
        for a in np.unique(pairs[:, 0]):
            sig_a = read_signatures(self.work / "sigs", int(a), self.bands, self.rows, len(keys[a]))
            mine = np.flatnonzero(pairs[:, 0] == a)
            for b in np.unique(pairs[mine, 2]):
                sel = mine[pairs[mine, 2] == b]
                sig_b = sig_a if a == b else read_signatures(self.work / "sigs", int(b), self.bands, self.rows,
                                                             len(keys[b]))
                score[sel] = (sig_a[pairs[sel, 1]] == sig_b[pairs[sel, 3]]).mean(axis=1)
                keep[sel] = score[sel] >= confirm_level(self.threshold, self.bands * self.rows)
        return keep, score

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.track_time():
            self.cluster()
        return
        yield  # a step with no output documents

    def cluster(self) -> None:
        # memory-mapped: 16 bytes per document of the corpus, read only where a pair points
        keys = [np.load(self.work / "keys" / f"{r:05d}.npy", mmap_mode="r") for r in range(self.tasks)]
        pairs = read_pairs(self.work / "buckets")
        keep, score = self.confirmed(pairs, keys)
        self.stat_update("candidate pairs", value=len(pairs))
        self.stat_update("confirmed pairs", value=int(keep.sum()))
        pairs, score = pairs[keep], score[keep]
        # nodes: the documents of confirmed pairs sorted by order key, so a cluster's smallest node is its first
        ends = np.concatenate([pairs[:, :2], pairs[:, 2:]]).astype(np.int64)
        order, first, inverse = np.unique(column(keys, ends, 0), return_index=True, return_inverse=True)
        nodes = ends[first]  # (task, doc) of each node
        edges = inverse.reshape(2, -1).T
        root = components(edges, len(order))
        self.write(keys, order, nodes, root, edges, score)

    def write(self, keys: list[np.ndarray], order: np.ndarray, nodes: np.ndarray, root: np.ndarray,
              edges: np.ndarray, score: np.ndarray) -> None:
        removed = np.flatnonzero(root != np.arange(len(order)))
        digest = column(keys, nodes, 1)
        exact = int((digest[removed] == digest[root[removed]]).sum())
        out = self.work / "remove"
        out.mkdir(parents=True, exist_ok=True)
        for task in range(self.tasks):
            docs = np.sort(nodes[removed][nodes[removed, 0] == task, 1]).astype("<u4")
            with atomic_file(out / f"{task:06d}.remove", "wb") as f:
                f.write(docs.tobytes())
        best = np.zeros(len(order))
        np.maximum.at(best, edges[:, 0], score)
        np.maximum.at(best, edges[:, 1], score)
        examples = [f"{self.where(order[i])}: duplicate of {self.where(order[root[i]])} "
                    f"(estimated Jaccard {best[i]:.2f})" for i in removed[:EXAMPLES]]
        summary = {"clusters": int(len(np.unique(root))), "removed": int(len(removed)), "exact": exact,
                   "near": int(len(removed) - exact), "examples": examples}
        self.stat_update("removed: exact duplicate", value=exact)
        self.stat_update("removed: near duplicate", value=int(len(removed) - exact))
        write_text(self.work / "clusters.json", json.dumps(summary, indent=1) + "\n")

    def where(self, key: int) -> str:
        return f"{self.inputs[int(key) >> FILE_BITS]}:{int(key) & ((1 << FILE_BITS) - 1)}"


def column(keys: list[np.ndarray], ends: np.ndarray, col: int) -> np.ndarray:
    """Column ``col`` (0: order key, 1: text digest) of the documents given as (task, doc) rows."""
    out = np.zeros(len(ends), np.int64)
    for t in np.unique(ends[:, 0]):
        sel = ends[:, 0] == t
        out[sel] = keys[int(t)][ends[sel, 1].astype(np.int64), col]
    return out
