"""`mtnlg checkpoint inspect` and `export` on a one-process run ended by train.exit_interval (a checkpoint
written by two tensor-parallel ranks is inspected and exported in tests/test_job_limits.py)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtnlg.checkpoint.model import load_model
from mtnlg.cli import main
from tests.harness.cli import small_run_flags

TRAIN = small_run_flags(n_layers=2, micro_batch_size=2, eval_iters=2)


@pytest.fixture(scope="module")
def run(train_data_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 10-step run of which this job did 3 (train.exit_interval=3), saving every 2; its output."""
    out = tmp_path_factory.mktemp("ckpt-cli") / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["train", *train_data_flags, *TRAIN, "--train.steps=10", "--train.exit_interval=3",
                     "--train.save_interval=2", "--out", str(out)]) == 0
    return out, buffer.getvalue()


def test_exit_interval_ends_the_job_with_a_checkpoint_and_says_how_to_continue(run: tuple[Path, str]) -> None:
    out, printed = run
    assert (out / "latest").read_text() == "step_00000003"
    assert "training stopped at step 3 (train.exit_interval=3)" in printed
    assert f"the run continues to train.steps=10: mtnlg train --resume --out {out}" in printed


def test_inspect_reports_progress_layout_model_sizes_and_checksums(run: tuple[Path, str], capsys) -> None:
    out, _ = run
    assert main(["checkpoint", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"checkpoint   {out / 'step_00000003'}" in text
    assert "step 3: 384 tokens (12 samples), 0 skipped steps" in text  # 3 steps x 4 sequences x 32 tokens
    assert "saved under  world size 1: dp=1 pp=1 tp=1" in text
    assert "L=2 hidden=64 heads=4 ffn=256 seq=32 vocab=512" in text
    assert "checksums    ok (" in text
    assert main(["checkpoint", "inspect", str(out), "--json", "--no-verify"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 3 and report["training"] and report["checksums"] == "not verified"
    expected = sum(p.numel() for p in load_model(out)[0].parameters())  # the tied output weight counted once
    assert report["parameters"] == expected
    assert report["sizes"]["model.safetensors"] == (out / "step_00000003" / "model.safetensors").stat().st_size
    assert report["layout"]["world_size"] == 1


def test_inspect_names_a_corrupted_file_and_fails(run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    broken = shutil.copytree(run[0] / "step_00000003", tmp_path / "broken")
    with open(broken / "trainer.json", "a", encoding="utf-8") as f:
        f.write(" ")
    assert main(["checkpoint", "inspect", str(broken)]) == 1
    assert f"checksums    FAILED: {broken / 'trainer.json'} is corrupted" in capsys.readouterr().out
    assert main(["checkpoint", "export", str(broken), "--out", str(tmp_path / "w")]) == 2
    assert "trainer.json is corrupted" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_step_saved_mid_run_has_no_weights_file_and_loads_from_train_state(
    run: tuple[Path, str], tmp_path: Path, capsys
) -> None:
    """Consolidated weights are written when a job ends, not at every save; inference on an
    intermediate step reads (and verifies) its train_state/ instead."""
    mid, end = run[0] / "step_00000002", run[0] / "step_00000003"
    assert not (mid / "model.safetensors").exists() and (end / "model.safetensors").is_file()
    assert main(["generate", "--checkpoint", str(mid), "--prompt", "The", "--max-new-tokens", "8"]) == 0
    assert len(capsys.readouterr().out.strip()) > 3
    model = load_model(mid)[0]
    assert not torch.equal(model.wte.weight, load_model(end)[0].wte.weight)  # a step earlier: other weights
    broken = shutil.copytree(mid, tmp_path / "broken")
    shard = next((broken / "train_state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    assert main(["generate", "--checkpoint", str(broken), "--prompt", "The"]) == 2
    assert f"{shard.name} is corrupted or truncated" in capsys.readouterr().err


def test_export_from_train_state_alone_generates_the_same_text(run: tuple[Path, str], tmp_path: Path,
                                                                capsys) -> None:
    """model.safetensors removed: export rebuilds it from train_state/; generate and convert --to-hf load it."""
    source = shutil.copytree(run[0] / "step_00000003", tmp_path / "source")
    original = load_file(str(source / "model.safetensors"))
    (source / "model.safetensors").unlink()
    assert main(["checkpoint", "export", str(source), "--out", str(tmp_path / "w"), "--no-verify"]) == 0
    exported = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["checksums.json", "config.json",
                                                                  "model.safetensors", "tokenizer"]
    texts = []
    for checkpoint in (run[0], tmp_path / "w"):
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "The", "--max-new-tokens", "8",
                     "--temperature", "0"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    assert main(["convert", "--to-hf", str(tmp_path / "w"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["checkpoint", "export", str(source), "--out", str(tmp_path / "w")]) == 2  # not without --overwrite
    assert "already holds a model checkpoint: give --overwrite" in capsys.readouterr().err
    assert main(["checkpoint", "export", str(source), "--out", str(tmp_path / "w"), "--overwrite", "--no-verify"]) == 0
    assert main(["checkpoint", "export", str(source), "--out", str(tmp_path / "hf"), "--overwrite"]) == 2
    assert "is not a model checkpoint, so it is not replaced" in capsys.readouterr().err  # an HF export stays
    assert main(["checkpoint", "export", str(source), "--out", str(source / "exported")]) == 2
    assert "overlaps the source" in capsys.readouterr().err  # never into the run it reads
