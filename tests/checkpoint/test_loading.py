"""Loading for inference verifies what it loads, and every bad file or argument is one line, not a traceback."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch

import mtnlg.checkpoint.directory as checkpoint
from mtnlg.checkpoint.directory import CheckpointError, resolve_verified
from mtnlg.checkpoint.model import load_model, save_model
from mtnlg.cli import main
from mtnlg.config import Config, ModelConfig
from mtnlg.generate.engine import Engine
from mtnlg.generate.load import load_for_inference
from mtnlg.generate.quantize import INT8_WEIGHTS_FILE, quantize_model, save_quantized
from mtnlg.model.gpt import GPT


@pytest.fixture
def cfg(small_tokenizer) -> Config:
    return Config(model=ModelConfig(vocab_size=small_tokenizer.vocab_size, seq_len=32, n_layers=1, hidden=32,
                                    n_heads=2, padded_vocab_multiple=64))


@pytest.fixture
def ckpt(tmp_path: Path, cfg: Config, small_tokenizer) -> Path:
    torch.manual_seed(0)
    return save_model(tmp_path / "ckpt", GPT(cfg.model), cfg, small_tokenizer)


def flip(path: Path, offset: int = -64, n: int = 16) -> None:
    """Invert ``n`` bytes at ``offset`` (the end of the weights: tensor data, not the header)."""
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def generate(ckpt: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["generate", "--checkpoint", str(ckpt), "--prompt", "The", "--max-new-tokens", "3", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_flipped_bytes_are_refused_naming_the_file(ckpt: Path, capsys) -> None:
    assert (ckpt / "checksums.json").is_file()
    assert generate(ckpt, capsys)[0] == 0
    flip(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted or truncated"):
        load_model(ckpt)
    code, out, err = generate(ckpt, capsys)
    assert code == 2 and not out and "model.safetensors is corrupted" in err and len(err.strip().splitlines()) == 1
    flip(ckpt / "model.safetensors")  # restored: loads again (the failed file was not remembered as good)
    load_model(ckpt)


def test_damaged_files_without_a_manifest_are_one_line_errors(ckpt: Path, capsys, monkeypatch) -> None:
    (ckpt / "checksums.json").unlink()
    monkeypatch.setattr(checkpoint, "_UNVERIFIABLE", set())
    with pytest.warns(UserWarning, match="no checksums.json"):
        load_model(ckpt)
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    for damaged in (good[: len(good) // 2], b"\xff" * 8 + good[8:], good[:5]):
        weights.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="safetensors"):
            load_model(ckpt)
        code, _, err = generate(ckpt, capsys)
        assert code == 2 and "model.safetensors" in err and "Traceback" not in err


def test_a_missing_tokenizer_names_the_checkpoint(ckpt: Path, capsys) -> None:
    shutil.rmtree(ckpt / "tokenizer")
    checkpoint.write_checksums(ckpt, local=True)  # a complete checkpoint, just without a tokenizer
    code, _, err = generate(ckpt, capsys)
    assert code == 2 and str(ckpt) in err and "tokenizer" in err


def test_a_run_falls_back_from_a_missing_or_corrupted_latest(tmp_path: Path, cfg: Config, small_tokenizer) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for step, seed in ((1, 1), (2, 2)):
        torch.manual_seed(seed)
        save_model(run / f"step_{step:08d}", GPT(cfg.model), cfg, small_tokenizer)
    (run / "latest").write_text("step_00000003")  # a step that was never completed
    with pytest.warns(UserWarning, match="previous good checkpoint .*step_00000002.*step_00000003"):
        assert resolve_verified(run) == run / "step_00000002"
    (run / "latest").write_text("step_00000002")
    flip(run / "step_00000002" / "model.safetensors")
    with pytest.warns(UserWarning, match="step_00000001.*step_00000002.*corrupted"):
        model, _, _ = load_model(run)
    torch.manual_seed(1)
    assert torch.equal(model.wte.weight, GPT(cfg.model).wte.weight)
    flip(run / "step_00000001" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_model(run)


def test_int8_checkpoints_are_verified_too(ckpt: Path, tmp_path: Path) -> None:
    model, cfg, tok = load_model(ckpt)
    out = save_quantized(tmp_path / "int8", quantize_model(model), cfg, tok)
    load_for_inference(out)
    flip(out / INT8_WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="model-int8.safetensors is corrupted"):
        Engine.from_checkpoint(out)


def test_an_unchanged_checkpoint_is_hashed_once_per_process(ckpt: Path, monkeypatch) -> None:
    hashed = []
    original = checkpoint.sha256
    monkeypatch.setattr(checkpoint, "sha256", lambda path: hashed.append(path.name) or original(path))
    monkeypatch.setattr(checkpoint, "_VERIFIED", set())
    load_model(ckpt)
    first = sorted(hashed)
    assert "model.safetensors" in first and "config.json" in first
    load_model(ckpt)
    assert sorted(hashed) == first  # nothing hashed again
    (ckpt / "config.json").touch()  # a changed modification time: checked again
    load_model(ckpt)
    assert hashed.count("config.json") == 2 and hashed.count("model.safetensors") == 1


# -- arguments are validated before any work, in one line ------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["convert", "--to-hf", "/nonexistent/ckpt", "--out", "x"], "checkpoint not found"),
        (["generate", "--checkpoint", "CKPT", "--seed", "-1"], "--seed"),
        (["generate", "--checkpoint", "CKPT", "--temperature", "nan"], "--temperature"),
        (["generate", "--checkpoint", "CKPT", "--top-k", "100000"], "top_k"),
        (["generate", "--checkpoint", "CKPT", "--repetition-penalty", "0"], "repetition_penalty"),
        (["serve", "--checkpoint", "CKPT", "--port", "99999"], "--port"),
        (["serve", "--checkpoint", "CKPT", "--max-batch-size", "0"], "--max-batch-size"),
        (["serve", "--checkpoint", "CKPT", "--api-key", ""], "--api-key is empty"),
        (["serve", "--checkpoint", "CKPT", "--max-body-bytes", "0"], "--max-body-bytes"),
        (["preprocess", "--input", "x", "--tokenizer", "t", "--output-prefix", "o", "--workers", "0"], "--workers"),
    ],
)
def test_bad_arguments_fail_before_loading_anything(ckpt: Path, argv: list[str], fragment: str, capsys,
                                                    monkeypatch) -> None:
    monkeypatch.setattr(Engine, "from_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
    argv = [str(ckpt) if a == "CKPT" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own check of the value
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err


def test_serve_refuses_a_port_in_use_before_loading(ckpt: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(Engine, "from_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(ckpt), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_refuses_an_empty_key_from_the_environment(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MTNLG_API_KEY", "")
    assert main(["serve", "--checkpoint", str(ckpt), "--port", "1"]) == 2
    assert "$MTNLG_API_KEY is empty" in capsys.readouterr().err
