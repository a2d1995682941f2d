"""``--resume`` continues a run with its saved configuration; the command line changes only what it names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtnlg.checkpoint.directory import write_checksums
from mtnlg.checkpoint.training import find_resume_point
from mtnlg.cli import main
from mtnlg.config import Config, ParallelConfig
from mtnlg.train.metrics import read_log
from mtnlg.train.run import resume_base

SMALL = [
    "--no-progress", "--model.seq_len=32", "--model.n_layers=2", "--model.hidden=64", "--model.n_heads=4",
    "--train.micro_batch_size=4", "--train.global_batch_size=4", "--train.log_interval=1",
    "--train.eval_interval=3", "--train.eval_iters=1", "--train.save_interval=3", "--train.peak_flops=1e12",
    "--data.split=8,2,0", "--train.device=cpu",
]  # fmt: skip
RECIPE = ["--train.lr=1e-3", "--train.warmup_steps=2", "--train.decay_steps=8"]


@pytest.fixture(scope="module")
def corpus(tiny_corpus: Path) -> Path:
    return tiny_corpus


def _trace(run: Path) -> list[tuple[str, int, float, float | None]]:
    return [(r["kind"], r["step"], r["loss"], r.get("lr")) for r in read_log(run / "log.jsonl")]


def _resume_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("resume: ")]


@pytest.fixture(scope="module")
def straight(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    data = ["--tokenizer", str(corpus / "tok"), "--data-path", str(corpus / "data" / "py")]
    assert main(["train", *data, "--out", str(out), *SMALL, *RECIPE, "--train.steps=8"]) == 0
    return out


def test_resume_with_no_flags_continues_the_saved_recipe(corpus, straight, tmp_path, monkeypatch, capsys):
    """Relative data paths at first, nothing but --out and --train.steps on resume: the same
    losses, learning rates and validation passes as the 8-step run straight through."""
    monkeypatch.chdir(corpus)
    out = tmp_path / "run"
    assert main(["train", "--tokenizer", "tok", "--data-path", "data/py", "--out", str(out), *SMALL, *RECIPE,
                 "--train.steps=6"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # elsewhere: the checkpoint's paths are absolute
    assert main(["train", "--out", str(out), "--resume", "--train.steps=8"]) == 0
    printed = capsys.readouterr().out
    assert _resume_lines(printed) == ["resume: train.steps 6 -> 8"]
    assert f"resuming from {out / 'step_00000006'}" in printed
    assert _trace(out) == _trace(straight)
    saved = find_resume_point(out).config
    assert saved.train.lr == 1e-3 and saved.train.decay_steps == 8


def test_resume_prints_each_changed_field_and_ignores_a_path_spelled_differently(corpus, tmp_path, monkeypatch,
                                                                                  capsys):
    """The same data given absolute (it was relative), the run directory relative (it was absolute):
    no change; an override is one, printed old -> new."""
    monkeypatch.chdir(corpus)
    out = tmp_path / "run"
    first = ["train", "--tokenizer", "tok", "--data-path", "data/py", "--out", str(out), *SMALL]
    assert main([*first, "--train.steps=3"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", os.path.relpath(out), "--resume", "--data-path", str(corpus / "data" / "py"),
                 "--tokenizer", "tok", "--train.steps=4", "--train.log_interval=2", "--no-progress"]) == 0
    lines = _resume_lines(capsys.readouterr().out)
    assert lines == ["resume: train.steps 3 -> 4", "resume: train.log_interval 1 -> 2"], lines
    assert [r["step"] for r in read_log(out / "log.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_resume_into_another_model_shape_is_still_refused(straight, tmp_path, capsys):
    assert main(["train", "--out", str(straight), "--resume", "--model.hidden=128"]) == 2
    assert "model.hidden: checkpoint 64, config 128" in capsys.readouterr().err


def test_the_parallel_layout_comes_from_the_launch(tmp_path):
    """A tp=2 run resumes in one process: [parallel] is not restored, every other section is."""
    step = tmp_path / "run" / "step_00000004"
    step.mkdir(parents=True)
    cfg = Config(parallel=ParallelConfig(tp=2))
    cfg.train.lr = 2e-4
    (step / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    (step / "train_state").mkdir()  # what a resumable step has beside its config (not read here)
    (step / "trainer.json").write_text("{}", encoding="utf-8")
    (tmp_path / "run" / "latest").write_text(step.name, encoding="utf-8")
    write_checksums(step, local=True)
    point = find_resume_point(tmp_path / "run")
    assert point.step_dir == step and point.config.parallel.tp == 2
    base = resume_base(point)
    assert base.parallel == ParallelConfig() and base.train.lr == 2e-4 and point.config.parallel.tp == 2
    assert find_resume_point(tmp_path / "nothing-here") is None
