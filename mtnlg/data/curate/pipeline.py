"""``mtnlg curate``: the stages, the engine that runs them, resuming, and the stats JSON.

Four stages, each a set of independent tasks run by a datatrove executor that marks every task
complete (``.curate/logs/STAGE/completions/RANK``) when its output is written; a rerun skips the
marked tasks and redoes the rest, so a task that died is redone alone:

1. ``prepare`` (one task per group of input shards): read, language ID, decontamination, PII
   redaction; stage the documents and write their MinHash signatures, one file per band;
2. ``buckets`` (one task per LSH band): candidate pairs from the band's sorted signatures;
3. ``clusters`` (one task): confirm the candidates, cluster, choose what each task removes;
4. ``write`` (one task per shard group again): drop the removed documents and write the kept
   records as ``OUTPUT/RANK.jsonl`` (and, with a tokenizer, ``OUTPUT/tokens/RANK.bin/.idx``).

Then ``OUTPUT/stats.json`` sums the counters of every task of every stage.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtnlg.data.indexed import DataError
from mtnlg.util.fs import read_json, write_text

JSON_SUFFIXES = (".jsonl", ".json")
STAGES = ("1-prepare", "2-buckets", "3-clusters", "4-write")
ENGINES = ("local", "ray", "slurm")


@dataclass
class CurateConfig:
    """What ``mtnlg curate`` does; the fields that change its output are recorded in the work folder."""

    inputs: list[str]
    output: str
    tasks: int = 0  # 0: one task per input file
    workers: int = 1
    engine: str = "local"
    dedup: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    decontaminate: list[str] = field(default_factory=list)
    contamination_ngram: int = 13
    report_only: bool = False
    redact_pii: bool = False
    languages: list[str] = field(default_factory=list)
    language_score: float = 0.5
    tokenizer: str | None = None
    strict: bool = False
    text_key: str = "text"
    progress: bool = True
    engine_options: dict = field(default_factory=dict)  # ray: address; slurm: partition, time, ...

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of: {', '.join(ENGINES)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"--dedup-threshold must be in (0, 1], got {self.threshold}")
        if self.workers < 1 or self.tasks < 0 or self.num_perm < 2 or self.ngram < 1 or self.contamination_ngram < 1:
            raise ValueError("--workers, --num-perm and the n-gram sizes must be positive, --tasks >= 0")

    def recorded(self) -> dict:
        """The settings a rerun must share with the run that made the work folder."""
        skip = {"workers", "engine", "progress", "engine_options", "strict"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def input_files(inputs: list[str], output: str) -> tuple[Path, list[str], list[str]]:
    """The JSONL files: as given, and the ``.jsonl``/``.json`` files of folders (sorted; hidden
    folders and the output folder left out); their common folder, their paths relative to it, and
    their paths as the user spelled them (for messages)."""
    out = Path(output).resolve()
    given: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            given += sorted(f for f in item.rglob("*") if f.suffix in JSON_SUFFIXES and f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(item).parts)
                            and out not in f.resolve().parents)
        elif item.exists():  # a file, or a named pipe that streams one
            if item.suffix not in JSON_SUFFIXES:
                raise DataError(f"curate reads JSON Lines (.jsonl/.json), not {item}")
            given.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if not given:
        raise FileNotFoundError(f"no .jsonl/.json files in {', '.join(inputs)}")
    paths = [p.resolve() for p in given]
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return root, [str(p.relative_to(root)) for p in paths], [str(p) for p in given]


def _stage_pipelines(cfg: CurateConfig, work: Path, root: Path, files: list[str], shown: list[str],
                     tasks: int) -> dict[str, tuple]:
    """Stage name -> (pipeline steps, number of tasks)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupFilter
    from datatrove.utils.hashing import HashConfig

    from mtnlg.data.curate import filters
    from mtnlg.data.curate.cluster import Cluster, OrderKeys, Signatures, lsh_bands
    from mtnlg.data.curate.records import RecordReader, StagedReader, Words, record_writer, staging_writer

    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    mh = MinhashConfig(n_grams=cfg.ngram, num_buckets=bands, hashes_per_bucket=rows, seed=cfg.seed,
                       hash_config=HashConfig(precision=32, hash_fc="sha1"))
    prepare: list = [RecordReader(str(root), str(work / "inputs.txt"), files, cfg.text_key, cfg.strict)]
    if cfg.languages:
        prepare.append(filters.LanguageID(cfg.languages, cfg.language_score))
    if cfg.decontaminate:
        prepare.append(filters.Decontaminate([str(Path(p).resolve()) for p in cfg.decontaminate],
                                             cfg.contamination_ngram, cfg.report_only))
    if cfg.redact_pii:
        prepare.append(filters.RedactPII())
    prepare += [OrderKeys(str(work / "keys")), staging_writer(str(work / "staged"))]
    write: list = [StagedReader(str(work / "staged"))]
    stages = {}
    if cfg.dedup:
        prepare.append(Signatures(str(work / "sigs"), mh, language=Words(cfg.ngram)))
        stages["2-buckets"] = ([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=mh)], bands)
        stages["3-clusters"] = ([Cluster(str(work), tasks, bands, rows, cfg.threshold, shown)], 1)
        write.append(MinhashDedupFilter(str(work / "remove")))
    write.append(record_writer(cfg.output))
    if cfg.tokenizer:
        from mtnlg.data.curate.tokenize import MegatronShards

        write.append(MegatronShards(str(Path(cfg.tokenizer).resolve()), str(Path(cfg.output) / "tokens")))
    return {"1-prepare": (prepare, tasks), **stages, "4-write": (write, tasks)}


def _check_work_folder(cfg: CurateConfig, work: Path, files: list[str]) -> None:
    """A rerun continues only the run whose settings made the folder (else its markers would lie)."""
    plan = {**cfg.recorded(), "files": files}
    plan["inputs"] = plan["output"] = None  # paths may be spelled differently
    saved = work / "plan.json"
    if saved.is_file():
        if read_json(saved) != plan:
            raise DataError(f"{work.parent} holds a curation run with other settings or inputs; "
                            "give a new --output or delete that folder")
        return
    work.mkdir(parents=True, exist_ok=True)
    write_text(work / "inputs.txt", "".join(f"{f}\n" for f in files))
    write_text(saved, json.dumps(plan, indent=1) + "\n")


def run_curation(cfg: CurateConfig) -> dict:
    """Run (or resume) every stage; returns the stats also written to ``OUTPUT/stats.json``."""
    from mtnlg.data.curate.engines import make_executor

    cfg.validate()
    root, files, shown = input_files(cfg.inputs, cfg.output)
    tasks = cfg.tasks or len(files)
    work = Path(cfg.output) / ".curate"
    _check_work_folder(cfg, work, files)
    previous = None
    for name, (steps, count) in _stage_pipelines(cfg, work, root, files, shown, tasks).items():
        executor = make_executor(cfg, steps, count, str(work / "logs" / name), previous)
        if cfg.engine == "slurm":  # submitted as a chain of dependent jobs; the last run() submits all
            previous = executor
            continue
        with _progress(work / "logs" / name / "completions", count, name, cfg.progress):
            executor.run()
    if cfg.engine == "slurm":
        previous.run()
        return {"submitted": True, "logs": str(work / "logs")}
    stats = collect_stats(work, [s for s in STAGES if (work / "logs" / s).is_dir()])
    write_text(Path(cfg.output) / "stats.json", json.dumps(stats, indent=1) + "\n")
    return stats


class _progress:
    """A bar per stage counting completed tasks (completion markers), polled while the stage runs."""

    def __init__(self, markers: Path, total: int, name: str, enabled: bool) -> None:
        self.markers, self.total, self.name, self.enabled = markers, total, name, enabled
        self._stop = threading.Event()
        self._stream = sys.stderr  # the terminal's, before any task redirects its own

    def _done(self) -> int:
        return len(list(self.markers.iterdir())) if self.markers.is_dir() else 0

    def _poll(self) -> None:
        from tqdm import tqdm

        with tqdm(total=self.total, desc=self.name, unit="task", initial=self._done(), file=self._stream) as bar:
            while not self._stop.wait(0.2):
                if (done := self._done()) != bar.n:
                    bar.update(done - bar.n)
            bar.update(self._done() - bar.n)

    def __enter__(self) -> _progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()


def _counter(value: object) -> float:
    return value.get("total", 0) if isinstance(value, dict) else float(value or 0)


def _step_name(name: str) -> str:
    """datatrove's step names without their emoji and type prefix ("📖 - READER: x" -> "READER: x")."""
    return " ".join(re.sub(r"[^\x20-\x7e]", "", name).split()).strip(" -")


def collect_stats(work: Path, stages: list[str]) -> dict:
    """Each stage's counters summed over its tasks' stats files (``logs/STAGE/stats/RANK.json``),
    with the seconds spent per step; duplicate clusters and examples from ``clusters.json``; and a
    ``summary`` of what was read, removed (by reason), redacted and kept."""
    out: dict = {}
    for stage in stages:
        steps: dict[str, dict] = {}
        for path in sorted((work / "logs" / stage / "stats").glob("*.json")):
            for step in json.loads(path.read_text(encoding="utf-8")):
                mine = steps.setdefault(_step_name(step["name"]), {"seconds": 0.0})
                mine["seconds"] += _counter(step.get("time_stats"))
                for label, value in (step.get("stats") or {}).items():
                    mine[label] = mine.get(label, 0) + _counter(value)
        out[stage] = {name: {k: (int(v) if k != "seconds" and float(v).is_integer() else round(v, 3))
                             for k, v in s.items()} for name, s in steps.items()}
    if (work / "clusters.json").is_file():
        out["duplicates"] = read_json(work / "clusters.json")
    return {"summary": summarize(out), **out}


SUMMARY_PREFIXES = ("bad line: ", "removed: ", "language ", "pii ")


def summarize(stages: dict) -> dict:
    """The counters people look for, gathered from every step of every stage."""
    summary: dict = {"read": 0, "kept": 0}
    for stage, steps in stages.items():
        if stage == "duplicates":
            continue
        for name, counters in steps.items():
            for label, value in counters.items():
                if label == "documents read":
                    summary["read"] += value
                elif stage == "4-write" and name.startswith("WRITER") and label == "total":
                    summary["kept"] += value
                elif label.startswith(SUMMARY_PREFIXES) or ": contaminated" in label or ": overlapping" in label:
                    summary[label] = summary.get(label, 0) + value
    return {"read": summary.pop("read"), "kept": summary.pop("kept"), **dict(sorted(summary.items()))}
