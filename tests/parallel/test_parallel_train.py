"""`mtnlg train` jobs of 2 ranks under pipeline and data parallelism against one process.

Runs are shared, each on 2 gloo ranks forked as ``torchrun`` would start them (``cli_world``), but
the restart test, which is torchrun's own: a single-process run of 20
steps, two pp=2 runs (1f1b, stopped by ``train.exit_interval=10`` as a cluster job would be;
interleaved 1f1b with 2 stages per rank), a dp=2 (FSDP) run and a dp=2 zero=1 (distributed optimizer) run
of 10 steps, checkpointed every 5;
then resumes under other layouts (the pp=2 job's rest in one process and under dp=2 must continue
the 20-step run's loss trace; the dp=2 run's step 5, saved asynchronously by the two ranks' writer
processes, in one process), and the dp=2 run again with a rank killed and restarted by torchrun.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint.model import load_model
from mtnlg.cli import main
from tests.harness.cli import at_step, cli_world, finish, losses, small_run_flags, start_torchrun, valid_losses

RTOL = 1e-5
TRAIN = small_run_flags(n_layers=4, micro_batch_size=2, eval_iters=2)
INTERLEAVED = ["--parallel.pp_schedule=interleaved_1f1b", "--parallel.pp_stages_per_rank=2"]


@pytest.fixture(scope="module")
def runs(train_data_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pp-runs")
    args = ["train", *train_data_flags, *TRAIN, "--train.steps=10", "--out"]
    assert main([*args, str(root / "single"), "--train.steps=20"]) == 0
    cli_world([*args, str(root / "pp2"), "--parallel.pp=2", "--train.steps=20", "--train.exit_interval=10"])
    cli_world([*args, str(root / "pp2-interleaved"), "--parallel.pp=2", *INTERLEAVED])
    cli_world([*args, str(root / "dp2"), "--train.async_save=true"])  # dp=2; step 5 written by each rank's writer
    cli_world([*args, str(root / "dp2-zero1"), "--parallel.dp=2", "--parallel.zero=1"])  # the distributed optimizer
    return {name: root / name for name in ("single", "pp2", "pp2-interleaved", "dp2", "dp2-zero1")}


@pytest.mark.parametrize("layout", ["pp2", "pp2-interleaved", "dp2", "dp2-zero1"])
def test_ten_steps_log_the_single_process_losses(runs: dict[str, Path], layout: str) -> None:
    single, pp = losses(runs["single"]), losses(runs[layout])
    assert sorted(single) == list(range(1, 21)) and sorted(pp) == list(range(1, 11))
    assert [pp[s] for s in range(1, 11)] == pytest.approx([single[s] for s in range(1, 11)], rel=RTOL)
    assert valid_losses(runs[layout]) == pytest.approx(valid_losses(runs["single"])[:3], rel=RTOL)  # steps 0, 5, 10
    assert single[10] < single[1]


def test_pp2_checkpoint_is_whole_and_generates_in_one_process(runs: dict[str, Path], capsys) -> None:
    """Every stage's weights reach model.safetensors; `mtnlg generate` on it prints the single run's text
    (at its step 10, a step saved without model.safetensors: loaded from its train_state/)."""
    single = runs["single"] / "step_00000010"
    assert (runs["pp2"] / "step_00000010" / "model.safetensors").is_file()
    (pp_model, _, _), (ref_model, _, _) = load_model(runs["pp2"]), load_model(single)
    ref = dict(ref_model.named_parameters())
    for name, p in pp_model.named_parameters():
        torch.testing.assert_close(p, ref[name], rtol=1e-4, atol=1e-5)
    for sampling in (["--temperature", "0"], ["--temperature", "1", "--seed", "7"]):  # greedy, seeded
        texts = []
        for checkpoint in (runs["pp2"], single):
            args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "The", "--max-new-tokens", "24"]
            assert main([*args, *sampling]) == 0
            texts.append(capsys.readouterr().out)
        assert texts[0] == texts[1]
    assert len(set(texts[0].strip())) > 5  # the seeded sample is a real continuation, not only newlines


def test_pp2_resumes_its_checkpoint_bitwise(runs: dict[str, Path], train_data_flags: list[str], tmp_path: Path) -> None:
    """The pp=2 job's step-5 checkpoint resumed under pp=2 logs the straight job's losses exactly.

    The resume must name ``--parallel.pp=2``: the saved config brings back every section but
    ``[parallel]`` (the layout of the new launch), so two processes without it run dp=2, another
    reduction order, equal only to float rounding (by chance bitwise on AVX2, not on AVX-512).
    """
    again = at_step(runs["pp2"], tmp_path / "pp2-again")
    out = cli_world(["train", *train_data_flags, "--resume", "--parallel.pp=2", "--train.exit_interval=5",
                    "--out", str(again)])
    assert f"resuming from {again / 'step_00000005'}" in out and "resume: parallel." not in out
    assert json.loads((again / "step_00000010" / "layout.json").read_text(encoding="utf-8"))["pp"] == 2
    got, want = losses(again), losses(runs["pp2"])
    assert sorted(got) == list(range(1, 11))
    assert [got[s] for s in range(6, 11)] == [want[s] for s in range(6, 11)]  # exact


@pytest.mark.parametrize("layout", ["one process", "dp2"])
def test_the_pp2_job_continued_under_another_layout_equals_the_straight_run(
    runs: dict[str, Path], train_data_flags: list[str], tmp_path: Path, layout: str
) -> None:
    """20 steps in one process == 10 steps as a pp=2 job stopped by exit_interval + the other 10 steps
    in one process, or under dp=2 (each job resumes the last one's checkpoint, resharded)."""
    rest = at_step(runs["pp2"], tmp_path / "rest", step=10)
    resume = ["train", *train_data_flags, "--resume", "--out", str(rest), "--parallel.pp=1"]
    if layout == "dp2":
        cli_world([*resume, "--parallel.dp=2"])
    else:
        assert main(resume) == 0
    got, want = losses(rest), losses(runs["single"])
    assert sorted(got) == list(range(1, 21))
    assert [got[s] for s in range(11, 21)] == pytest.approx([want[s] for s in range(11, 21)], rel=RTOL)
    assert valid_losses(rest)[-1] == pytest.approx(valid_losses(runs["single"])[-1], rel=RTOL)


def test_a_killed_rank_restarts_the_job_which_logs_the_uninterrupted_losses(
    runs: dict[str, Path], train_data_flags: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dp=2 run again under ``torchrun --max-restarts=1 ... --resume=auto``; SIGKILL rank 1 once
    rank 0 has logged a step past the step-5 checkpoint (a random one of 6-8). torchrun restarts
    both ranks, which resume step 5 by themselves and finish: the log equals the straight run's, bitwise."""
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")  # each log line reaches the pipe when printed
    run = tmp_path / "run"
    proc = start_torchrun(["train", *train_data_flags, *TRAIN, "--train.steps=10", "--resume=auto",
                           "--out", str(run)], launcher=["--max-restarts=1"])
    assert proc.stdout is not None
    kill_after, seen = f"step {random.randint(6, 8)}/", ""
    while kill_after not in seen:
        line = proc.stdout.readline()
        assert line, f"torchrun ended before {kill_after}: {seen[-3000:]}"
        seen += line
    workers = [int(pid) for pid in os.popen(f"pgrep -P {proc.pid}").read().split()]  # torchrun's children
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # the later-started worker: rank 1
    out = seen + finish(proc, timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert f"no checkpoint in {run}: starting from step 0" in out and f"resuming from {run / 'step_00000005'}" in out
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", out), out[-3000:]  # torchrun saw the kill
    assert losses(run) == losses(runs["dp2"])  # exact, step by step


def test_a_dp2_checkpoint_continues_in_one_process(
    runs: dict[str, Path], train_data_flags: list[str], tmp_path: Path
) -> None:
    into_single = at_step(runs["dp2"], tmp_path / "into-single")
    assert main(["train", *train_data_flags, "--resume", "--train.exit_interval=2", "--out", str(into_single)]) == 0
    got, want = losses(into_single), losses(runs["single"])
    assert [got[6], got[7]] == pytest.approx([want[6], want[7]], rel=RTOL)
