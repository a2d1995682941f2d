"""Preprocessing throughput and peak memory: mtnlg with 1 and 2 workers vs a plain HF `tokenizers` loop.

Every case runs in a fresh subprocess over the same embedded corpus with the same tokenizer and
reports its own peak RSS and the peak memory of it and its workers together (Linux /proc).
A last case feeds 4x the input to show that memory does not grow with the input size.

    .venv/bin/python benchmarks/preprocess.py [--vocab-size 8192] [--out benchmarks/results/preprocess.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from run_info import run_info

CASES = ["import_only", "hf_loop", "mtnlg_1_worker", "mtnlg_2_workers", "mtnlg_2_workers_4x_input"]


def _kb(path: str, field: str) -> int:
    """A ``field:  N kB`` line of a /proc file, or 0 once the process is gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak memory of this process plus its children (the workers), sampled every 50 ms from /proc.

    It sums the proportional set size (PSS): pages that forked workers share with the parent are split
    between them rather than counted once per process. ``ru_maxrss`` cannot be used: Linux carries it
    over ``exec`` from the parent, which here is the benchmark driver.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb = 0
        self.running = True

    def _children(self) -> list[str]:
        me, kids = str(os.getpid()), []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.append(pid)
            except (OSError, IndexError):
                continue
        return kids

    def run(self) -> None:
        while self.running:
            pids = ["self"] + self._children()
            self.peak_kb = max(self.peak_kb, sum(_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in pids))
            time.sleep(0.05)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_case(case: str, corpus: Path, tokenizer: Path, work: Path) -> dict:
    """One measurement, in this (fresh) process; imports (done already) cost nothing here."""
    if case == "import_only":  # the interpreter + mtnlg (which imports torch): the floor of the mtnlg cases
        start = time.perf_counter()
        import mtnlg.data.preprocess  # noqa: F401

        return {"seconds": time.perf_counter() - start}
    if case == "hf_loop":  # what a user would write by hand: one process, one document at a time
        from tokenizers import Tokenizer

        start = time.perf_counter()
        tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
        tokens = docs = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                tokens += len(tok.encode(json.loads(line)["text"]).ids) + 1  # + end of document
                docs += 1
        return {"seconds": time.perf_counter() - start, "documents": docs, "tokens": tokens}
    from mtnlg.data.preprocess import preprocess

    start = time.perf_counter()
    inputs = [corpus] * (4 if case.endswith("4x_input") else 1)
    workers = 2 if "2_workers" in case else 1
    report = preprocess(inputs, tokenizer, work / case, workers=workers)
    return {"seconds": time.perf_counter() - start, "documents": report.documents, "tokens": report.tokens}


def measure(case: str, corpus: Path, tokenizer: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--corpus", str(corpus), "--tokenizer", str(tokenizer),
           "--work", str(work)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if "tokens" in result:
        result["tokens_per_s"] = round(result["tokens"] / result["seconds"])
        result["tokens_per_cpu_s"] = round(result["tokens"] / result["cpu_seconds"])
    return {"case": case, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "preprocess.json")
    args = parser.parse_args()
    load_start = os.getloadavg()
    if args.case:  # child process: measure and print one JSON line
        if args.case != "import_only":  # imports are not part of the measured work
            importlib.import_module("tokenizers" if args.case == "hf_loop" else "mtnlg.data.preprocess")
        sampler = MemorySampler()
        sampler.start()
        cpu = _cpu_seconds()
        result = run_case(args.case, args.corpus, args.tokenizer, args.work)
        result["cpu_seconds"] = _cpu_seconds() - cpu  # load-independent, unlike wall-clock time
        sampler.running = False
        sampler.join()
        result["peak_rss_mb"] = round(_kb("/proc/self/status", "VmHWM") / 1024, 1)
        result["peak_pss_with_workers_mb"] = round(sampler.peak_kb / 1024, 1)
        print(json.dumps(result))
        return

    from mtnlg.data.corpus import build_corpus
    from mtnlg.data.tokenizer import Tokenizer, iter_text_files

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stats = build_corpus(work / "corpus.jsonl")
        Tokenizer.train(iter_text_files([work / "corpus.jsonl"]), args.vocab_size).save(work / "tok")
        results = [measure(c, work / "corpus.jsonl", work / "tok", work) for c in CASES]
    report = {
        "benchmark": "preprocess the embedded corpus (Python docs) into .bin/.idx",
        "corpus": {"documents": stats.documents, "megabytes": round(stats.bytes / 1e6, 2)},
        "vocab_size": args.vocab_size,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "note": "seconds exclude imports; on a shared machine wall-clock figures are noisy, CPU seconds less so",
        "results": results,
        "run": run_info(load_start),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for r in results:
        rate = f"{r['tokens_per_s']:>9,} tokens/s ({r['tokens_per_cpu_s']:>9,} per CPU-s)" if "tokens" in r else ""
        print(f"{r['case']:26s} {r['seconds']:6.2f} s {rate:38s} peak RSS {r['peak_rss_mb']:6.1f} MB, "
              f"with workers (PSS) {r['peak_pss_with_workers_mb']:6.1f} MB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
