"""The training loop: exact resume, accumulation, NaN skipping, mixed precision, Ctrl-C, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from mtnlg.checkpoint.model import load_model
from mtnlg.cli import main
from mtnlg.config import ConfigError, build_config
from mtnlg.train.metrics import MetricsLog, read_log
from mtnlg.train.optim import validate_batch_sizes
from tests.harness.training import RandomTokens, make_config, make_trainer, train_losses

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bitwise_identical(tmp_path, small_model_config, optimizer):
    """6 steps straight == 3 steps, a new process-like restart, --resume, 3 more (dropout on: RNGs matter;
    Muon: its momentum buffers and AdamW's moments of the other parameters travel in one optimizer state)."""
    model_cfg = dataclasses.replace(small_model_config, dropout=0.1)
    straight = make_trainer(make_config(model_cfg, tmp_path / "a", optimizer=optimizer))
    straight.fit()

    first = make_trainer(make_config(model_cfg, tmp_path / "b", steps=3, decay_steps=6, optimizer=optimizer))
    first.fit()
    torch.manual_seed(999)  # whatever ran in between must not matter
    resumed = make_trainer(make_config(model_cfg, tmp_path / "b", optimizer=optimizer))
    assert resumed.resume() == tmp_path / "b" / "step_00000003"
    resumed.fit()

    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # exact float equality, step by step
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    valid = [r for r in read_log(tmp_path / "b" / "log.jsonl") if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [0, 3, 6]


def test_accumulation_matches_one_big_batch(tmp_path, small_model_config):
    """One micro-batch of 8 and eight micro-batches of 1 give the same step, up to float rounding."""
    data = RandomTokens(16, small_model_config.seq_len, small_model_config.vocab_size)
    results = []
    for micro in (8, 1):
        cfg = make_config(small_model_config, tmp_path / str(micro), micro_batch_size=micro, global_batch_size=8)
        trainer = make_trainer(cfg, data)
        stats = trainer.train_step()
        results.append((stats, [p.detach().clone() for p in trainer.model.parameters()]))
    (big, big_params), (small, small_params) = results
    assert small.loss == pytest.approx(big.loss, rel=1e-5)
    assert small.grad_norm == pytest.approx(big.grad_norm, rel=1e-4)
    # Adam's first step divides each gradient by its own magnitude: where a gradient is near zero
    # (embedding rows the batch barely touches) float rounding moves the update by a few percent
    # of the ~5e-4 step, hence the absolute tolerance.
    for p, q in zip(big_params, small_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-5)


def test_non_finite_step_is_skipped_and_counted(tmp_path, small_model_config):
    trainer = make_trainer(make_config(small_model_config, tmp_path))
    trainer.train_step()
    poison = {"on": True}
    hook = trainer.model.ln_f.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] else out)
    params = [p.detach().clone() for p in trainer.model.parameters()]
    optim_steps = [s["step"].clone() for s in trainer.optimizer.state.values()]

    stats = trainer.train_step()
    assert stats.skipped and trainer.state.skipped_steps == 1 and not np.isfinite(stats.loss)
    assert all(torch.equal(p, q) for p, q in zip(params, trainer.model.parameters(), strict=True))
    assert all(torch.equal(a, s["step"]) for a, s in zip(optim_steps, trainer.optimizer.state.values(), strict=True))
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing leaks into the next step

    poison["on"] = False
    stats = trainer.train_step()
    assert not stats.skipped and np.isfinite(stats.loss) and trainer.state.step == 3
    assert not all(torch.equal(p, q) for p, q in zip(params, trainer.model.parameters(), strict=True))
    hook.remove()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(tmp_path, small_model_config, precision):
    data = RandomTokens(16, small_model_config.seq_len, small_model_config.vocab_size)
    reference = make_trainer(make_config(small_model_config, tmp_path / "fp32"), data).train_step()
    trainer = make_trainer(make_config(small_model_config, tmp_path / precision, precision=precision), data)
    stats = trainer.train_step()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert stats.loss == pytest.approx(reference.loss, abs=0.05)
    if precision == "fp16":  # the dynamic loss scale is part of the checkpoint
        trainer.save()
        saved = json.loads((tmp_path / "fp16" / "step_00000001" / "trainer.json").read_text())
        assert saved["scaler"]["scale"] == trainer.scaler.get_scale()


def test_ctrl_c_saves_a_checkpoint_then_resume_finishes(tmp_path, small_model_config):
    class InterruptAt(RandomTokens):
        def __getitem__(self, i: int) -> np.ndarray:
            if i == 9:  # during step 3 (samples 8..11)
                os.kill(os.getpid(), signal.SIGINT)
            return super().__getitem__(i)

    cfg = make_config(small_model_config, tmp_path, save_interval=0)
    trainer = make_trainer(cfg, InterruptAt(64, cfg.model.seq_len, cfg.model.vocab_size))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.step == 3  # the step in flight was completed, not torn
    assert (tmp_path / "latest").read_text() == "step_00000003"
    resumed = make_trainer(cfg)
    resumed.resume()
    assert resumed.fit().step == 6


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory):
    """A slice of the embedded corpus, a 512-token BPE and its indexed dataset."""
    from mtnlg.data.corpus import build_corpus
    from mtnlg.data.preprocess import preprocess
    from mtnlg.data.tokenizer import Tokenizer, iter_text_files

    root = tmp_path_factory.mktemp("corpus")
    build_corpus(root / "corpus.jsonl", modules=["json", "textwrap", "argparse", "string"])
    Tokenizer.train(iter_text_files([root / "corpus.jsonl"]), vocab_size=512).save(root / "tok")
    preprocess([root / "corpus.jsonl"], root / "tok", root / "data" / "py")
    return root


def test_cli_trains_on_the_embedded_corpus_and_the_loss_falls(tmp_path, corpus_data):
    out = tmp_path / "run"
    args = ["train", "--tokenizer", str(corpus_data / "tok"), "--data-path", str(corpus_data / "data" / "py"),
            "--out", str(out), "--no-progress", "--model.seq_len=64", "--model.n_layers=2", "--model.hidden=64",
            "--model.n_heads=4", "--train.micro_batch_size=8", "--train.global_batch_size=8", "--train.lr=3e-3",
            "--train.steps=40", "--train.warmup_steps=4", "--train.eval_interval=20", "--train.eval_iters=4",
            "--train.log_interval=5", "--train.save_interval=20", "--train.peak_flops=1e12", "--data.split=8,2,0"]
    assert main(args) == 0
    valid = [r["loss"] for r in read_log(out / "log.jsonl") if r["kind"] == "valid"]
    assert len(valid) == 3 and valid[-1] < valid[0] - 0.7  # from ~ln(512) = 6.24 to about 5.3
    assert (out / "loss.png").stat().st_size > 1000
    model, cfg, tokenizer = load_model(out)  # the run directory is a generation checkpoint
    assert cfg.model.vocab_size == 512 and tokenizer.vocab_size == 512
    assert not model.training and sorted(p.name for p in out.glob("step_*")) == ["step_00000020", "step_00000040"]
    # --resume with more steps continues from step 40
    assert main([*args, "--resume", "--train.steps=45"]) == 0
    assert max(train_losses(out)) == 45


def test_tensorboard_is_an_optional_dependency(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            MetricsLog(tmp_path, tensorboard=True)
        return
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"kind": "train", "step": 1, "loss": 2.0})
    log.close()
    assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    cfg = build_config("tiny", path)
    validate_batch_sizes(cfg.train)
    assert cfg.train.steps > 0
