"""Job limits: train.exit_interval / exit_duration_mins split a run into jobs that train exactly as one;
the schedule warning on resume; parallel.timeout_s bounds the wait for other ranks."""

from __future__ import annotations

import dataclasses
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtnlg.checkpoint.tools import export_checkpoint, inspect_checkpoint
from mtnlg.config import ConfigError, ModelConfig, ParallelConfig, build_config
from mtnlg.parallel.dims import init_distributed
from mtnlg.train.build import build_model
from mtnlg.train.metrics import read_log
from mtnlg.train.run import report_changes
from mtnlg.train.trainer import Trainer
from tests.harness.dist import run_world
from tests.harness.training import RandomTokens, make_config, make_trainer, train_losses

TINY = ModelConfig(vocab_size=300, seq_len=32, n_layers=2, hidden=64, n_heads=4, padded_vocab_multiple=64)


def test_a_run_split_by_exit_interval_equals_the_straight_run_bitwise(tmp_path: Path, small_model_config) -> None:
    """3 steps straight == three jobs of train.exit_interval=1, each a fresh trainer resuming the last
    (dropout on, so the RNG streams matter); the LR schedule still runs to train.steps=3."""
    model_cfg = dataclasses.replace(small_model_config, dropout=0.1)
    short = dict(steps=3, eval_interval=2, save_interval=0)
    straight = make_trainer(make_config(model_cfg, tmp_path / "a", **short))
    straight.fit()
    split_cfg = make_config(model_cfg, tmp_path / "b", **short, exit_interval=1)
    for job, stop in enumerate((1, 2, 3)):
        torch.manual_seed(1000 + job)  # whatever ran in between must not matter
        trainer = make_trainer(split_cfg)
        trainer.resume()
        assert trainer.fit().step == stop  # returns (no KeyboardInterrupt) after 1 step of this job
        assert (tmp_path / "b" / "latest").read_text() == f"step_{stop:08d}"
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")  # exact, step by step
    for (name, p), q in zip(straight.model.named_parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    valid = [[(r["step"], r["loss"]) for r in read_log(tmp_path / run / "log.jsonl") if r["kind"] == "valid"]
             for run in ("a", "b")]
    assert valid[0] == valid[1] and [s for s, _ in valid[0]] == [0, 2, 3]


def test_exit_duration_stops_after_the_step_that_reaches_it_and_saves(tmp_path: Path, small_model_config) -> None:
    cfg = make_config(small_model_config, tmp_path, steps=3, save_interval=0, exit_duration_mins=30)
    trainer = make_trainer(cfg)
    assert trainer.fit(started=time.monotonic() - 3600).step == 1  # the job began an hour ago
    assert (tmp_path / "latest").read_text() == "step_00000001"
    again = make_trainer(cfg)
    again.resume()
    assert again.fit().step == 3  # a fresh job's clock starts now: it runs to train.steps


def _one_rank_past_its_deadline(out: str) -> tuple[int, list[str]]:
    """Two tensor-parallel ranks; only rank 1's job started long ago. Both must stop after the same step."""
    import torch.distributed as dist

    cfg = build_config(overrides=[f"--train.out={out}", "--train.device=cpu", "--train.micro_batch_size=2",
                                  "--train.global_batch_size=2", "--train.steps=5", "--train.eval_interval=0",
                                  "--train.save_interval=0", "--train.peak_flops=1e12",
                                  "--train.exit_duration_mins=30", "--parallel.tp=2"])
    cfg.model = dataclasses.replace(TINY)
    dims = init_distributed(cfg.parallel, "cpu")
    trainer = Trainer(cfg, build_model(cfg, dims.device, dims), RandomTokens(16, TINY.seq_len, TINY.vocab_size),
                      dims=dims, progress=False)
    late = dist.get_rank() == 1
    step = trainer.fit(started=time.monotonic() - (3600 if late else 0)).step
    return step, sorted(p.name for p in Path(out).glob("step_*"))


def test_the_ranks_decide_to_stop_together(tmp_path: Path) -> None:
    """Rank 0's clock says go on, rank 1's says stop: both stop after step 1 and save that step
    (a rank deciding alone would leave the other waiting in a collective until the timeout).
    The checkpoint records the layout that wrote it, and exports in one process from its tp shards
    to the weights the ranks consolidated from their shards."""
    results = run_world(_one_rank_past_its_deadline, 2, str(tmp_path / "run"), timeout=120)
    assert results == [(1, ["step_00000001"])] * 2
    step = tmp_path / "run" / "step_00000001"
    report = inspect_checkpoint(step)
    assert report.layout is not None and report.checksums.startswith("ok")
    layout = {k: report.layout[k] for k in ("world_size", "dp", "pp", "tp")}
    assert layout == {"world_size": 2, "dp": 1, "pp": 1, "tp": 2}
    (step / "model.safetensors").rename(tmp_path / "gathered.safetensors")  # export must not need it
    export_checkpoint(step, tmp_path / "w", verify=False)
    exported, gathered = (load_file(str(f)) for f in (tmp_path / "w" / "model.safetensors",
                                                       tmp_path / "gathered.safetensors"))
    assert exported.keys() == gathered.keys()
    assert all(torch.equal(exported[k], gathered[k]) for k in gathered)


def test_changing_steps_on_resume_warns_unless_decay_steps_is_fixed() -> None:
    saved = build_config(overrides=["--train.steps=100"])
    longer = build_config(overrides=["--train.steps=200"])
    with pytest.warns(UserWarning, match=r"train\.steps changed from 100 to 200.*--train\.decay_steps=100"):
        assert report_changes(saved, longer) == ["resume: train.steps 100 -> 200"]
    fixed = build_config(overrides=["--train.steps=200", "--train.decay_steps=100"])
    by_tokens = build_config(overrides=["--train.steps=200", "--train.decay_tokens=1000000"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        report_changes(saved, fixed)
        report_changes(saved, by_tokens)
        report_changes(saved, build_config(overrides=["--train.steps=100", "--train.exit_interval=10"]))


@pytest.mark.parametrize("field, value", [("train.exit_interval", "-1"), ("train.exit_duration_mins", "-0.5"),
                                          ("parallel.timeout_s", "0")])
def test_job_limit_fields_are_validated(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=field.split(".")[1]):
        build_config(overrides=[f"--{field}={value}"])


def test_a_rank_whose_peers_never_join_fails_after_parallel_timeout_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of a 2-process world alone: init fails after timeout_s, naming the rank and the setting."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(RuntimeError, match=r"rank 0 of 2: .* within parallel\.timeout_s=1 s"):
        init_distributed(ParallelConfig(timeout_s=1), "cpu")
