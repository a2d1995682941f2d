"""Curation at scale: datatrove vs Ray Data on one workload, the stages of `mtnlg curate` at 1x and
4x the corpus, and the blending-index build, 10 sources, vectorised vs the greedy loop it replaced.

* engines: the same work (read JSONL shards, redact PII, write JSONL) on datatrove's local executor
  and on Ray Data, 2 workers each: documents/s per core, the peak memory of the whole process tree
  and of its largest process, and what a rerun after one lost task costs;
* curate: `run_curation` (dedup + PII) over shards of a fixed size, 1x and 4x as many: documents/s
  of every step (its time summed over tasks, so per core) and peak memory per task process;
* blend: `blending_indices` (Megatron's greedy rule, compiled) for 10 sources x 10^8 samples, beside
  the due-time sort it replaced, megatron-core's `build_blending_indices`, and the same loop in
  Python timed on 10^6 samples and extrapolated linearly (it is one pass over the samples).

Every case runs in a fresh subprocess.

    .venv/bin/python benchmarks/curate.py [--docs 50000] [--cases engines,curate,blend] [--append]

``--append`` adds this run to the ``runs`` list of an existing results file instead of replacing it
(a 1M-document run need not redo the engine comparison, which needs Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from preprocess import MemorySampler, _kb
from run_info import run_info

SHARD_DOCS = 12_500  # documents per shard (so per task) of the curate runs
ENGINE_SHARD_DOCS = 6_250  # 8 shards of the engine comparison: a lost task is an eighth of the work


class TreeSampler(MemorySampler):
    """Peak PSS of this process and all its descendants (Ray's workers are the raylet's children),
    and of the largest single process among them (a task's worker)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_process_kb = 0

    def _children(self) -> list[str]:
        parent: dict[str, str] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent[pid] = f.read().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
        tree, frontier = set(), {str(os.getpid())}
        while frontier:
            frontier = {p for p, pp in parent.items() if pp in frontier} - tree
            tree |= frontier
        return sorted(tree)

    def run(self) -> None:
        while self.running:
            sizes = [_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in self._children()]
            self.peak_process_kb = max([self.peak_process_kb, *sizes])
            self.peak_kb = max(self.peak_kb, _kb("/proc/self/smaps_rollup", "Pss") + sum(sizes))
            time.sleep(0.1)


def make_corpus(folder: Path, docs: int, shard_docs: int = SHARD_DOCS, seed: int = 0) -> list[str]:
    """Shards of ``shard_docs`` short documents (40 letter-only words), 4% near and 2% exact copies
    of earlier ones, one in 20 with an e-mail address or phone number."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(20000)]
    folder.mkdir(parents=True, exist_ok=True)
    recent: list[str] = []  # copies come from the recent past, across shard boundaries too
    paths = []
    for first in range(0, docs, shard_docs):
        shard = []
        for _ in range(first, min(docs, first + shard_docs)):
            r = rng.random()
            if r < 0.02 and recent:
                text = rng.choice(recent)
            elif r < 0.06 and recent:
                words = rng.choice(recent).split()
                words[rng.randrange(len(words))] = rng.choice(vocab)
                text = " ".join(words)
            else:
                text = " ".join(rng.choice(vocab) for _ in range(40))
            if rng.random() < 0.05:
                text += rng.choice([" write to someone@example.org", " call +44 20 7946 0958"])
            shard.append(text)
            recent = (recent + [text])[-2000:]
        path = folder / f"shard-{len(paths):04d}.jsonl"
        with open(path, "w") as f:
            f.writelines(json.dumps({"id": first + i, "text": t}) + "\n" for i, t in enumerate(shard))
        paths.append(str(path))
    return paths


def case_datatrove(corpus: Path, work: Path) -> dict:
    from mtnlg.data.curate.engines import QuietLocalExecutor, quiet_logs
    from mtnlg.data.curate.filters import RedactPII
    from mtnlg.data.curate.records import RecordReader, record_writer

    files = sorted(p.name for p in corpus.glob("*.jsonl"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "inputs.txt").write_text("".join(f + "\n" for f in files))

    def run() -> float:
        quiet_logs()
        steps = [RecordReader(str(corpus), str(work / "inputs.txt"), files), RedactPII(),
                 record_writer(str(work / "out"))]
        start = time.perf_counter()
        QuietLocalExecutor(steps, tasks=len(files), workers=2, logging_dir=str(work / "logs"),
                           start_method="fork").run()
        return time.perf_counter() - start

    seconds = run()
    (work / "logs" / "completions" / "00001").unlink()  # one task lost: the rerun redoes it alone
    rerun = run()
    redone = sum(1 for _ in open(corpus / files[1]))
    return {"seconds": seconds, "rerun_after_one_lost_task_seconds": rerun, "tasks": len(files),
            "rerun_documents": redone}


def case_ray(corpus: Path, work: Path) -> dict:
    import ray

    from mtnlg.data.curate.filters import PLACEHOLDERS, RedactPII

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    kinds = RedactPII().kinds

    def redact(batch: dict) -> dict:
        from datatrove.pipeline.formatters.pii import PIIReplacer

        replacers = [PIIReplacer(regex, PLACEHOLDERS[k], check) for k, (regex, check) in kinds.items()]
        texts = list(batch["text"])
        for r in replacers:
            texts = [r.replace(t) for t in texts]
        batch["text"] = texts
        return batch

    def run() -> float:
        start = time.perf_counter()
        ds = ray.data.read_json(sorted(str(p) for p in corpus.glob("*.jsonl")))
        ds.map_batches(redact, batch_format="numpy").write_json(str(work / "ray-out"))
        return time.perf_counter() - start

    seconds = run()
    shutil.rmtree(work / "ray-out")
    rerun = run()  # Ray Data keeps no per-task completion: a rerun processes everything again
    ray.shutdown()
    return {"seconds": seconds, "rerun_after_one_lost_task_seconds": rerun,
            "rerun_documents": sum(1 for p in corpus.glob("*.jsonl") for _ in open(p))}


def case_curate(corpus: Path, work: Path) -> dict:
    from mtnlg.data.curate.pipeline import CurateConfig, run_curation

    start = time.perf_counter()
    stats = run_curation(CurateConfig([str(corpus)], str(work / "out"), workers=2, redact_pii=True, progress=False))
    seconds = time.perf_counter() - start
    docs = {"1-prepare": stats["summary"]["read"], "4-write": stats["4-write"]["DEDUP: MinHash stage 4"]["total"]}
    rates = {f"{stage} / {name}": round(docs[stage] / counters["seconds"])
             for stage, steps in stats.items() if stage in docs
             for name, counters in steps.items() if counters.get("seconds")}
    seconds_by_step = {f"{stage} / {name}": counters["seconds"] for stage, steps in stats.items()
                       if stage.startswith(("2-", "3-")) for name, counters in steps.items()}
    return {"seconds": seconds, "cpu_seconds": cpu_seconds(), "summary": stats["summary"],
            "duplicates": stats["duplicates"]["removed"], "documents_per_task_second_by_step": rates,
            "task_seconds_by_step": seconds_by_step}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def case_blend(_: Path, __: Path) -> dict:
    """The compiled greedy loop at 10^8 samples, beside the due-time sort it replaced (BLEND_VERSION 2),
    megatron-core's helper (its own time convention) and the Python loop (10^6 samples, extrapolated:
    it is one pass). Each timed in wall and CPU seconds of this process (CPU is what load inflates least)."""
    import numpy as np

    from mtnlg.data.blend import blending_indices, load_helper, megatron_core_helpers, python_blend

    weights = list(np.random.default_rng(0).dirichlet(np.ones(10)))
    result: dict = {"sources": 10, "samples": 10**8}

    def timed(name: str, fn, *args):  # noqa: ANN001, ANN202
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        result[f"{name}_seconds"] = round(time.perf_counter() - wall, 2)
        result[f"{name}_cpu_seconds"] = round(time.process_time() - cpu, 2)
        return out

    timed("helper_load_or_build", load_helper)
    d = timed("compiled", blending_indices, weights, 10**8)[0]
    counts = np.bincount(d, minlength=10)
    old = timed("python_loop_at_1e6", python_blend, weights, 10**6)[0]
    result["python_loop_cpu_seconds_extrapolated_to_1e8"] = result["python_loop_at_1e6_cpu_seconds"] * 100
    result["same_as_python_loop_at_1e6"] = bool(np.array_equal(d[:10**6], old))
    result["largest_final_count_error"] = float(np.abs(counts - 10**8 * np.asarray(weights)).max())
    result["largest_prefix_error_at_1e6"] = {"compiled_greedy": worst_prefix_error(d[:10**6], weights)}
    del d
    due = timed("due_time_sort_v2", due_time_blend, weights, 10**8)[0]
    result["largest_prefix_error_at_1e6"]["due_time_sort_v2"] = worst_prefix_error(due[:10**6], weights)
    del due
    helpers = megatron_core_helpers()
    if helpers is not None:
        md, ms = np.empty(10**8, np.int16), np.empty(10**8, np.int64)
        timed("megatron_core_helper", helpers.build_blending_indices, md, ms, np.asarray(weights), 10, md.size, False)
        ours = timed("compiled_megatron_convention", blending_indices, weights, 10**8, False)[0]
        result["megatron_convention_equal_to_megatron_core"] = bool(np.array_equal(ours, md))
    return result


def due_time_blend(weights: list[float], size: int, chunk: int = 1 << 22):  # noqa: ANN201
    """The schedule of BLEND_VERSION 2 (samples sorted by due time ``(k + 1/2) / w_d``), for its time
    and its prefix error beside the greedy loop that replaced it."""
    import numpy as np

    w = np.asarray(weights, dtype=np.float64)
    chosen, local = np.empty(size, dtype=np.int16), np.empty(size, dtype=np.int64)
    filled, t0 = 0, 0.0
    while filled < size:
        t1 = t0 + chunk
        times, which, count = [], [], []
        for d, wd in enumerate(w):
            k = np.arange(max(0, int(np.floor(t0 * wd - 0.5))), int(np.ceil(t1 * wd - 0.5)) + 1, dtype=np.int64)
            t = (k + 0.5) / wd
            inside = (t >= t0) & (t < t1)
            times.append(t[inside]), count.append(k[inside]), which.append(np.full(int(inside.sum()), d, np.int16))
        t, d, k = np.concatenate(times), np.concatenate(which), np.concatenate(count)
        order = np.lexsort((d, t))[: size - filled]
        chosen[filled:filled + order.size], local[filled:filled + order.size] = d[order], k[order]
        filled, t0 = filled + order.size, t1
    return chosen, local


def worst_prefix_error(chosen, weights: list[float]) -> float:  # noqa: ANN001
    """The largest |served - n w_d| over every prefix and source."""
    import numpy as np

    return max(float(np.abs(np.cumsum(chosen == k) - np.arange(1, chosen.size + 1) * w).max())
               for k, w in enumerate(weights))


CASES = {"datatrove": case_datatrove, "ray_data": case_ray, "curate": case_curate, "blend": case_blend}


def measure(case: str, corpus: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--corpus", str(corpus), "--work", str(work)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {"case": case, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--docs", type=int, default=50_000, help="documents of the 1x corpus (4x runs too)")
    parser.add_argument("--engine-docs", type=int, default=50_000, help="documents of the engine comparison")
    parser.add_argument("--cases", default="engines,curate,blend", help="comma-separated subset of these three")
    parser.add_argument("--append", action="store_true", help="add the run to the results file's 'runs' list")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "curate.json")
    args = parser.parse_args()
    if args.case:  # one measurement in this fresh process
        sampler = TreeSampler()
        sampler.start()
        result = CASES[args.case](args.corpus, args.work)
        sampler.running = False
        sampler.join()
        result.update(peak_tree_mib=round(sampler.peak_kb / 1024),
                      peak_process_mib=round(sampler.peak_process_kb / 1024))
        print(json.dumps(result))
        return
    load, cases = os.getloadavg(), set(args.cases.split(","))
    previous = json.loads(args.out.read_text()) if args.append and args.out.is_file() else None
    results: list[dict] = []

    def save() -> dict:  # after every case, so a run cut short keeps what it measured
        report = {**run_info(load), "shard_documents": SHARD_DOCS, "engine_shard_documents": ENGINE_SHARD_DOCS,
                  "results": results}
        if previous is not None:
            report = {**previous, "runs": [*previous.get("runs", []), report]}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        return report

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "engines" in cases:
            make_corpus(root / "engines", args.engine_docs, ENGINE_SHARD_DOCS)
            for case in ("datatrove", "ray_data"):
                results.append({"documents": args.engine_docs, **measure(case, root / "engines", root / case)})
                save()
        for scale in (1, 4) if "curate" in cases else ():
            make_corpus(root / f"x{scale}", args.docs * scale)
            result = measure("curate", root / f"x{scale}", root / f"c{scale}")
            results.append({"documents": args.docs * scale, "shards": -(-args.docs * scale // SHARD_DOCS), **result})
            save()
            shutil.rmtree(root / f"x{scale}"), shutil.rmtree(root / f"c{scale}")
        if "blend" in cases:
            results.append(measure("blend", root, root))
    report = save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
