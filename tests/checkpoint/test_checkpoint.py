"""Training checkpoints: round trip, retention, crash safety, corruption fallback, config mismatch."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint.directory import CheckpointError, find_training_checkpoint
from mtnlg.checkpoint.model import load_model
from mtnlg.checkpoint.training import load_training_checkpoint, save_training_checkpoint
from mtnlg.config import Config, ModelConfig, config_from_dict
from mtnlg.model.gpt import GPT
from mtnlg.train.optim import build_optimizer

MODEL = dict(vocab_size=300, seq_len=64, n_layers=2, hidden=64, n_heads=4, padded_vocab_multiple=64)


def trained(cfg: Config, seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    """A model and optimizer after one real step, so the optimizer has state to save."""
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(idx, idx).backward()
    optimizer.step()
    return model, optimizer


def save(run: Path, step: int, model: GPT, optimizer, cfg: Config, keep_last: int = 0) -> Path:
    return save_training_checkpoint(run, step, model, optimizer, cfg, None, {"step": step}, keep_last)


@pytest.fixture
def cfg() -> Config:
    return Config(model=ModelConfig(**MODEL)).validate()


def test_round_trip_restores_model_optimizer_rng_and_state(tmp_path, cfg):
    model, optimizer = trained(cfg)
    torch.manual_seed(42)
    path = save(tmp_path, 7, model, optimizer, cfg)
    expected_draw = torch.rand(5)

    fresh, fresh_opt = trained(cfg, seed=1)
    assert find_training_checkpoint(tmp_path) == path
    state = load_training_checkpoint(path, fresh, fresh_opt, cfg)
    assert state == {"step": 7}
    assert torch.equal(torch.rand(5), expected_draw)  # the RNG continues where the save left it
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert fresh.lm_head.weight is fresh.wte.weight  # still tied after loading
    for a, b in zip(optimizer.state.values(), fresh_opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    inference, _, _ = load_model(path)  # the same directory serves generation
    assert torch.equal(inference.wte.weight, model.wte.weight)


def test_keeps_the_last_k_and_points_latest_at_the_newest(tmp_path, cfg):
    model, optimizer = trained(cfg)
    for step in (10, 20, 30, 40):
        save(tmp_path, step, model, optimizer, cfg, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000030", "step_00000040"]
    assert (tmp_path / "latest").read_text() == "step_00000040"


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    import mtnlg.checkpoint.model as model_files
    import mtnlg.checkpoint.training as ckpt
    from mtnlg.config import Config, ModelConfig
    from mtnlg.model.gpt import GPT
    from mtnlg.train.optim import build_optimizer

    run, marker = sys.argv[1], sys.argv[2]
    cfg = Config(model=ModelConfig(**{model}))
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    ckpt.save_training_checkpoint(run, 1, model, optimizer, cfg, None, {{"step": 1}})
    real_save_file = model_files.save_file

    def save_half_then_hang(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)  # the weights are half written when the kill comes
        open(marker, "w").close()
        time.sleep(600)

    model_files.save_file = save_half_then_hang
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    ckpt.save_training_checkpoint(run, 2, model, optimizer, cfg, None, {{"step": 2}})
    """
).format(model=MODEL)


def test_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path, cfg):
    run, marker = tmp_path / "run", tmp_path / "saving"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the child process died before reaching the save"
            assert time.monotonic() < deadline, "the child process never reached the second save"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert (run / ".step_00000002.tmp").is_dir()  # the torn write is still on disk, under its temporary name
    assert find_training_checkpoint(run) == run / "step_00000001"
    model, optimizer = trained(cfg)
    assert load_training_checkpoint(run / "step_00000001", model, optimizer, cfg) == {"step": 1}
    save(run, 2, model, optimizer, cfg)  # the next save of that step succeeds and clears the debris
    assert not (run / ".step_00000002.tmp").exists()
    assert find_training_checkpoint(run) == run / "step_00000002"


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_corrupted_latest_falls_back_to_the_previous_good_one(tmp_path, cfg, damage):
    model, optimizer = trained(cfg)
    save(tmp_path, 1, model, optimizer, cfg)
    save(tmp_path, 2, model, optimizer, cfg)
    victim = next((tmp_path / "step_00000002" / "train_state").glob("*.distcp"))
    data = victim.read_bytes()
    if damage == "flip a byte":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 3])
    else:
        victim.unlink()
    with pytest.warns(UserWarning, match=r"previous good checkpoint .*step_00000001.*step_00000002"):
        assert find_training_checkpoint(tmp_path) == tmp_path / "step_00000001"


def test_no_good_checkpoint_is_an_error(tmp_path, cfg):
    model, optimizer = trained(cfg)
    save(tmp_path, 1, model, optimizer, cfg)
    (tmp_path / "step_00000001" / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="checksums.json is missing"):
        find_training_checkpoint(tmp_path)
    assert find_training_checkpoint(tmp_path / "nothing-here") is None


def test_loading_into_another_model_shape_names_the_fields(tmp_path, cfg):
    model, optimizer = trained(cfg)
    path = save(tmp_path, 1, model, optimizer, cfg)
    other = dataclasses.replace(cfg, model=ModelConfig(**{**MODEL, "hidden": 32, "n_layers": 3}))
    small, small_opt = trained(other)
    with pytest.raises(CheckpointError, match=r"model.hidden: checkpoint 64, config 32.*model.n_layers: checkpoint 2"):
        load_training_checkpoint(path, small, small_opt, other)
    # dropout does not change the parameters: resuming with another value is allowed
    tweaked = dataclasses.replace(cfg, model=ModelConfig(**{**MODEL, "dropout": 0.1}))
    load_training_checkpoint(path, *trained(tweaked), tweaked)


def test_changed_data_settings_warn(tmp_path, cfg):
    model, optimizer = trained(cfg)
    path = save(tmp_path, 1, model, optimizer, cfg)
    moved = config_from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "seed": 7}})
    with pytest.warns(UserWarning, match=r"data.seed: checkpoint 1234, config 7"):
        load_training_checkpoint(path, model, optimizer, moved)


def _checksums_on_two_ranks(directory: str) -> tuple[int, str]:
    """In a 2-rank world: write and verify checksums, counting the files this rank hashed."""
    import mtnlg.checkpoint.directory as ckpt

    hashed = []
    real = ckpt.sha256
    ckpt.sha256 = lambda path: hashed.append(path.name) or real(path)
    try:
        ckpt.write_checksums(Path(directory))
        ckpt.verify_checksums(Path(directory))
        written = len(hashed)
        if torch.distributed.get_rank() == 1:
            (Path(directory) / "c.bin").write_bytes(b"damaged")
        torch.distributed.barrier()
        try:
            ckpt.verify_checksums(Path(directory))
        except CheckpointError as exc:
            return written, str(exc)
        return written, "no error"
    finally:
        ckpt.sha256 = real


def test_checksums_are_hashed_once_in_total_across_ranks(tmp_path):
    """Ranks split the reading (a big checkpoint is not read by rank 0 alone, nor by every rank),
    agree on the result, and all see the same corruption error."""
    import mtnlg.checkpoint.directory as ckpt
    from tests.harness.dist import run_world

    for name in ("a.bin", "b.bin", "c.bin", "sub/d.bin", "sub/e.bin"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(name.encode() * 1000)
    results = run_world(_checksums_on_two_ranks, 2, str(tmp_path))
    # each rank hashed its share twice (write, then verify) before the damage
    assert sorted(written for written, _ in results) == [2 * 2, 2 * 3]
    assert results[0][1] == results[1][1] and "c.bin is corrupted or truncated" in results[0][1]
    (tmp_path / "c.bin").write_bytes(b"c.bin" * 1000)
    ckpt.verify_checksums(tmp_path)  # the 2-rank manifest checks out in one process
