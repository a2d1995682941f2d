"""``mtnlg curate`` on the cluster engines without a cluster: the Slurm job arrays it submits (a fake
``sbatch`` on PATH records each script, and can run its array tasks the way Slurm would), and Ray
(skipped where ray is not installed)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from mtnlg.cli import main  # noqa: E402

SBATCH = r"""#!/bin/bash
# Records the script and its arguments as job N; with RUN_ARRAYS set, runs every array task of a
# stage in order (SLURM_ARRAY_TASK_ID=i; not the stats-merging jobs): Slurm's order too, as each
# stage depends on the one before.
set -e
n=$(( $(find "$SBATCH_LOG" -name '*.sh' | wc -l) + 1 ))
script="${@: -1}"
cp "$script" "$SBATCH_LOG/$n.sh"
printf '%s\n' "${@:1:$#-1}" > "$SBATCH_LOG/$n.args"
array=$(sed -n 's/^#SBATCH --array=0-\([0-9]*\).*/\1/p' "$script")
if [ -n "$RUN_ARRAYS" ] && grep -q launch_pickled_pipeline "$script"; then
  for i in $(seq 0 "$array"); do
    SLURM_ARRAY_TASK_ID=$i SLURM_NODELIST=node0 RUN_OFFSET=0 bash "$script" > "$SBATCH_LOG/$n.$i.out" 2>&1
  done
fi
echo "Submitted batch job $((1000 + n))"
"""
SCONTROL = r"""#!/bin/bash
[ "$1 $2" = "show hostnames" ] && echo "$3"
"""
SRUN = r"""#!/bin/bash
while [ $# -gt 0 ]; do case "$1" in -n|-N) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"
"""


def write_corpus(folder: Path, files: int = 2, per_file: int = 6) -> Path:
    folder.mkdir()
    for f in range(files):
        rows = [{"id": f"{f}-{i}", "text": f"document {f} {i} " + "word " * (i + 3)} for i in range(per_file)]
        rows.append(dict(rows[0], id=f"{f}-copy"))  # an exact copy for the dedup stage
        (folder / f"part-{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch-log"
    bin_dir.mkdir(), log.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # the venv's console scripts (launch_pickled_pipeline) as on a cluster node with the env active
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                     os.environ.get("PYTHONPATH")])))
    return log


def jobs(log: Path) -> list[tuple[str, list[str]]]:
    count = len(list(log.glob("*.sh")))
    return [((log / f"{n}.sh").read_text(), (log / f"{n}.args").read_text().split()) for n in range(1, count + 1)]


def directives(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.M))


def test_slurm_submits_one_array_per_stage_each_after_the_one_before(tmp_path: Path, fake_slurm: Path, capsys) -> None:
    corpus, out = write_corpus(tmp_path / "corpus"), tmp_path / "curated"
    assert main(["curate", "--input", str(corpus), "--output", str(out), "--engine", "slurm", "--workers", "3",
                 "--slurm-partition", "cpu", "--slurm-time", "1:00:00", "--quiet"]) == 0
    assert "submitted the curation jobs" in capsys.readouterr().out
    submitted = jobs(fake_slurm)
    arrays = [(directives(s), args, s) for s, args in submitted if "launch_pickled_pipeline" in s]
    names = [d["job-name"] for d, _, _ in arrays]
    assert names == ["mtnlg-1-prepare", "mtnlg-2-buckets", "mtnlg-3-clusters", "mtnlg-4-write"]
    bands = json.loads((out / ".curate" / "logs" / "2-buckets" / "executor.json").read_text())["tasks"]
    assert [d["array"] for d, _, _ in arrays] == ["0-1%2", f"0-{bands - 1}%3", "0-0%1", "0-1%2"]
    for d, _, script in arrays:
        assert d["partition"] == "cpu" and d["time"] == "1:00:00"
        stage = d["job-name"].removeprefix("mtnlg-")
        assert f"launch_pickled_pipeline {out.resolve() / '.curate' / 'logs' / stage / 'executor.pik'}" in script
    ids = {directives(s)["job-name"]: 1000 + n for n, (s, _) in enumerate(submitted, 1)
           if "launch_pickled_pipeline" in s}
    for (_, args, _), before in zip(arrays[1:], names, strict=False):  # each stage waits for the one before
        assert f"--dependency=afterok:{ids[before]}" in args
    assert "--dependency" not in " ".join(arrays[0][1])
    merges = [s for s, _ in submitted if "merge_stats" in s]  # datatrove's per-stage stats job
    assert len(merges) == 4


def test_slurm_array_tasks_run_as_slurm_would_equal_a_local_run(tmp_path: Path, fake_slurm: Path,
                                                                monkeypatch, capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--no-dedup", "--redact-pii", "--quiet"]
    monkeypatch.setenv("RUN_ARRAYS", "1")
    assert main(["curate", *common, "--output", str(tmp_path / "slurm"), "--engine", "slurm"]) == 0
    markers = tmp_path / "slurm" / ".curate" / "logs"
    scripts = [s for s, _ in jobs(fake_slurm)]
    assert len(scripts) == 4 and not any("--partition" in s for s in scripts)  # the cluster's default
    assert sorted(p.name for p in (markers / "4-write" / "completions").iterdir()) == ["00000", "00001"]
    # the rerun that writes the stats finds every task done and runs none
    assert main(["curate", *common, "--output", str(tmp_path / "slurm")]) == 0
    assert main(["curate", *common, "--output", str(tmp_path / "local")]) == 0
    for name in ("00000.jsonl", "00001.jsonl"):
        assert (tmp_path / "slurm" / name).read_text() == (tmp_path / "local" / name).read_text()
    slurm_stats = json.loads((tmp_path / "slurm" / "stats.json").read_text())["summary"]
    assert slurm_stats == json.loads((tmp_path / "local" / "stats.json").read_text())["summary"]
    assert slurm_stats["read"] == 14 and slurm_stats["kept"] == 14
    assert len(list((markers / "1-prepare" / "logs").glob("task_*.log"))) == 2  # written once, by the array tasks


def test_ray_runs_the_same_pipeline(tmp_path: Path, capsys) -> None:
    pytest.importorskip("ray", reason="ray is not installed (pip install ray): the Ray engine is untested here")
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--redact-pii", "--quiet"]
    assert main(["curate", *common, "--output", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]) == 0
    assert main(["curate", *common, "--output", str(tmp_path / "local")]) == 0
    assert sorted(p.read_text() for p in (tmp_path / "ray").glob("*.jsonl")) == \
        sorted(p.read_text() for p in (tmp_path / "local").glob("*.jsonl"))
