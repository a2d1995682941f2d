"""Every writer (quantize, convert --from-hf / --to-hf / --upcycle) refuses a non-empty --out unless it
holds what the writer makes and --overwrite is given, and never writes into its own source: one
line, and nothing in the refused directory is touched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint.model import save_model
from mtnlg.cli import main
from mtnlg.config import Config
from mtnlg.model.gpt import GPT


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model checkpoint, its HF export, and a run directory whose step is that checkpoint."""
    from mtnlg.config import ModelConfig

    root = tmp_path_factory.mktemp("writers")
    cfg = Config(model=ModelConfig(vocab_size=300, seq_len=32, n_layers=2, hidden=32, n_heads=2,
                                   padded_vocab_multiple=64)).validate()
    torch.manual_seed(0)
    save_model(root / "ckpt", GPT(cfg.model), cfg)
    assert main(["convert", "--to-hf", str(root / "ckpt"), "--out", str(root / "hf")]) == 0
    step = root / "run" / "step_00000005"
    shutil.copytree(root / "ckpt", step)
    (step / "train_state").mkdir()
    (step / "train_state" / "model.distcp").write_bytes(b"optimizer state")
    (root / "run" / "latest").write_text("step_00000005")
    return {"ckpt": root / "ckpt", "hf": root / "hf", "run": root / "run", "step": step}


def _notes(directory: Path) -> dict[str, bytes]:
    """A directory of someone's files; returns them, to check they are still there."""
    (directory / "sub").mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    (directory / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return _contents(directory)


def _contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _refused(args: list[str], capsys: pytest.CaptureFixture, *words: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


WRITERS = {
    "quantize": lambda s: ["quantize", "--checkpoint", str(s["ckpt"])],
    "from-hf": lambda s: ["convert", "--from-hf", str(s["hf"])],
    "to-hf": lambda s: ["convert", "--to-hf", str(s["ckpt"])],
    "upcycle": lambda s: ["convert", "--upcycle", str(s["ckpt"]), "--upcycle-experts", "2"],
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_writer_keeps_a_non_empty_out_that_is_not_its_kind(writer: str, sources: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    before = _notes(home)
    for extra in ([], ["--overwrite"]):
        _refused([*WRITERS[writer](sources), "--out", str(home), *extra], capsys, str(home), "not empty")
        assert _contents(home) == before


@pytest.mark.parametrize("writer", WRITERS)
def test_a_writer_never_writes_into_its_source(writer: str, sources: dict, capsys: pytest.CaptureFixture) -> None:
    source = {"quantize": "ckpt", "from-hf": "hf", "to-hf": "ckpt", "upcycle": "ckpt"}[writer]
    before = _contents(sources[source])
    _refused([*WRITERS[writer](sources), "--out", str(sources[source]), "--overwrite"], capsys, "source")
    assert _contents(sources[source]) == before


def test_quantizing_into_a_runs_step_is_refused_and_a_same_kind_out_needs_overwrite(
        sources: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = _contents(sources["run"])
    _refused(["quantize", "--checkpoint", str(sources["run"]), "--out", str(sources["step"]), "--overwrite"],
             capsys, "source")
    assert _contents(sources["run"]) == before
    out = tmp_path / "int8"
    assert main(["quantize", "--checkpoint", str(sources["ckpt"]), "--out", str(out)]) == 0
    _refused(["quantize", "--checkpoint", str(sources["ckpt"]), "--out", str(out)], capsys, "--overwrite")
    assert main(["quantize", "--checkpoint", str(sources["ckpt"]), "--out", str(out), "--overwrite"]) == 0
    _refused(["convert", "--upcycle", str(sources["ckpt"]), "--out", str(out), "--overwrite"], capsys, "not a model")


def test_an_export_of_a_llama_family_model_is_replaced_with_overwrite(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from mtnlg.config import ModelConfig

    cfg = Config(model=ModelConfig(vocab_size=300, seq_len=32, n_layers=1, hidden=32, n_heads=4, n_kv_heads=2,
                                   position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
                                   padded_vocab_multiple=64)).validate()
    save_model(tmp_path / "ckpt", GPT(cfg.model), cfg)
    to_hf = ["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]
    assert main(to_hf) == 0
    _refused(to_hf, capsys, "--overwrite")
    assert main([*to_hf, "--overwrite"]) == 0


def test_latest_is_followed_only_to_a_step_directory(sources: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from mtnlg.checkpoint.directory import CheckpointError, find_training_checkpoint, resolve, resolve_verified

    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text(os.path.relpath(sources["ckpt"], run))  # a real checkpoint, outside the run
    for read in (resolve, resolve_verified, find_training_checkpoint):
        with pytest.raises(CheckpointError, match="is not a step directory of the run"):
            read(run)
    _refused(["quantize", "--checkpoint", str(run), "--out", str(tmp_path / "q")], capsys, "step_N")
