"""A whole training run from a ``Config``: data, tokenizer, device, parallel layout, trainer, summary.

``mtnlg train`` is ``run_training(build_config(...))``, ``mtnlg finetune`` ``run_finetune``: they
differ in where the data, tokenizer and first weights come from, and share the rest (``_train``).
Everything here happens once per run; the loop itself is ``mtnlg.train.trainer.Trainer``.
"""

from __future__ import annotations

import copy
import ctypes
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mtnlg.checkpoint.model import load_config
from mtnlg.checkpoint.training import ResumePoint, find_resume_point
from mtnlg.config import Config, ConfigError, ParallelConfig, changes
from mtnlg.config.text import toml_value
from mtnlg.data.gpt_dataset import Dataset, build_datasets
from mtnlg.data.sft import build_instruction_data
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT
from mtnlg.parallel.dims import ParallelDims, destroy_distributed, init_distributed
from mtnlg.parallel.parallelize import parallelize
from mtnlg.train.build import build_model
from mtnlg.train.finetune import load_base_model
from mtnlg.train.metrics import LOG_FILE, plot_loss_curve, precision_warning, read_log
from mtnlg.train.resilience import guard_run
from mtnlg.train.trainer import Trainer
from mtnlg.util import dist as rank_info
from mtnlg.util.extras import missing_package_message


def resolve_device(name: str) -> torch.device:
    """``auto`` means the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use --train.device=cpu")
    return device


def reuse_freed_cpu_memory() -> None:
    """Make glibc serve large CPU tensors from the heap and keep freed memory for the next step.

    By default glibc maps each allocation over 32 MB freshly from the kernel and unmaps it when
    freed, so every step page-faults its large temporaries (logits, the dense embedding gradient)
    back in; keeping them makes a gpt2-small CPU step here 1.4-1.5x faster (benchmarks/train.py).
    Intel's PyTorch CPU tuning guide swaps in jemalloc or tcmalloc for the same reason. The cost
    is a resident set that stays at its peak. No-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # the largest value of its C int argument
    libc.mallopt(m_top_pad, 1 << 28)


@dataclass
class RunSummary:
    """What ``mtnlg train`` reports at the end."""

    out: Path
    steps: int
    finished: bool  # False: a job limit (train.exit_interval / exit_duration_mins) ended this job first
    skipped_steps: int
    first_valid_loss: float | None
    final_valid_loss: float | None
    plot: Path | None


def _load_tokenizer(cfg: Config) -> Tokenizer | None:
    """The run's tokenizer; the model's vocabulary is made to match it (as Megatron does)."""
    if not cfg.data.tokenizer:
        warnings.warn("no data.tokenizer given: checkpoints will not carry a tokenizer", stacklevel=3)
        return None
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        print(f"model.vocab_size {cfg.model.vocab_size} -> {tokenizer.vocab_size} to match {cfg.data.tokenizer}")
        cfg.model.vocab_size = tokenizer.vocab_size
    return tokenizer


def _record_absolute_paths(cfg: Config) -> None:
    """Paths go into checkpoints absolute, so a resume from another directory finds the same files,
    and the same file named relatively or absolutely is no change."""
    cfg.data.data_path = [p if _is_weight(p) else os.path.abspath(p) for p in cfg.data.data_path]
    for name in ("tokenizer", "cache_dir"):
        if value := getattr(cfg.data, name):
            setattr(cfg.data, name, os.path.abspath(value))
    cfg.finetune.data = [os.path.abspath(p) for p in cfg.finetune.data]
    if cfg.finetune.checkpoint:
        cfg.finetune.checkpoint = os.path.abspath(cfg.finetune.checkpoint)


def _is_weight(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resume_base(point: ResumePoint) -> Config:
    """What ``--resume`` builds on: the checkpoint's config, so a resumed run keeps its recipe
    unless the command line changes a field.

    ``[parallel]`` is the exception: it describes this launch (how many processes, how split),
    and the checkpoint loads into any layout, so it comes from the command line alone.
    """
    base = copy.deepcopy(point.config)
    base.parallel = ParallelConfig()
    return base


def report_changes(saved: Config, cfg: Config) -> list[str]:
    """Print (on the main rank) each field that differs from the checkpoint's config, old -> new.

    ``train.out`` is left out: it is where the checkpoint was just found, however it is spelled
    and wherever the run directory was first written.
    """
    lines = [f"resume: {name} {toml_value(old)} -> {toml_value(new)}"
             for name, old, new in changes(saved, cfg) if name != "train.out"]
    if rank_info.is_main():
        for line in lines:
            print(line)
        if (warning := schedule_warning(saved, cfg)) is not None:
            warnings.warn(warning, stacklevel=2)
    return lines


def schedule_warning(saved: Config, cfg: Config) -> str | None:
    """Why a resume with another ``train.steps`` trains differently, or None when it does not.

    The cosine decay ends at ``train.decay_steps``, which defaults to ``train.steps``: more (or
    fewer) steps then stretch (or squeeze) the rest of the schedule. Token-based schedules
    (``train.decay_tokens``) and an explicit ``train.decay_steps`` do not depend on it.
    """
    old, new = saved.train, cfg.train
    if old.steps == new.steps or new.decay_steps or new.decay_tokens:
        return None
    return (f"train.steps changed from {old.steps} to {new.steps} while train.decay_steps is 0 (= train.steps): "
            f"the learning-rate schedule changes from this step on; to keep it, also give "
            f"--train.decay_steps={old.decay_steps or old.steps}")


def _plot(trainer: Trainer) -> Path | None:
    """``loss.png`` of the run, or None (saying why) when matplotlib, an optional extra, is missing."""
    try:
        return plot_loss_curve(trainer.out / LOG_FILE, trainer.out / "loss.png")
    except ModuleNotFoundError as exc:
        print(f"no loss.png: {missing_package_message(exc.name) or exc}; the figures are in {trainer.out / LOG_FILE}")
        return None


Resume = bool | ResumePoint | None  # False/None: a new run; True: from train.out's newest good checkpoint


def run_training(cfg: Config, resume: Resume = False, progress: bool = True) -> RunSummary:
    """Build data, model and trainer from ``cfg``, optionally resume (from ``resume``, a checkpoint
    found by the caller, or with True from ``train.out``), and train."""
    started = time.monotonic()  # train.exit_duration_mins counts the setup too
    tc = cfg.train
    _record_absolute_paths(cfg)
    tokenizer = _load_tokenizer(cfg)
    resume = _report_resume(cfg, resume)
    sizes = (tc.steps * tc.global_batch_size, tc.eval_iters * tc.micro_batch_size, 0)
    train_data, valid_data, _ = build_datasets(cfg.data, cfg.model.seq_len, sizes, cfg.model.vocab_size)
    if tc.eval_interval and len(valid_data) == 0:
        warnings.warn(f"the validation split of data.split={cfg.data.split} has no documents: "
                      "no validation loss will be reported", stacklevel=2)
    return _train(cfg, train_data, valid_data, tokenizer, build_model, resume, progress, started)


def finetune_base(given: Config) -> Config:
    """What a new fine-tuning run's config builds on: the model and sampling defaults of
    ``finetune.checkpoint``, every other section at its defaults (a pretraining recipe is no
    fine-tuning one)."""
    if not given.finetune.checkpoint:
        raise ConfigError("finetune needs a model to start from: --checkpoint DIR (finetune.checkpoint)")
    saved = load_config(given.finetune.checkpoint)
    return Config(model=saved.model, generate=saved.generate)


def run_finetune(cfg: Config, resume: Resume = False, progress: bool = True) -> RunSummary:
    """``mtnlg finetune``: the model of ``finetune.checkpoint`` (its vocabulary grown for the chat
    markers) trained on ``finetune.data`` by the same loop, with the same checkpoints, logs and resume."""
    started = time.monotonic()
    _record_absolute_paths(cfg)
    if cfg.finetune.pack and cfg.parallel.pp > 1:
        raise ConfigError("packed fine-tuning samples cannot run through a pipeline (parallel.pp > 1): "
                          "use --finetune.pack=false")
    base, tokenizer = load_base_model(cfg)
    resume = _report_resume(cfg, resume)
    num_samples = cfg.train.steps * cfg.train.global_batch_size
    train_data, valid_data, report = build_instruction_data(cfg, tokenizer, num_samples)
    if rank_info.is_main():
        print(report.summary())

    def make_model(cfg: Config, device: torch.device, dims: ParallelDims) -> GPT:
        torch.manual_seed(cfg.train.seed)  # dropout draws from it
        return parallelize(base.to(device), dims, cfg)

    return _train(cfg, train_data, valid_data, tokenizer, make_model, resume, progress, started)


def _report_resume(cfg: Config, resume: Resume) -> ResumePoint | bool:
    """The checkpoint to resume from (found now if ``resume`` is True), its changes printed; True when
    one was asked for and the run has none yet, False for a new run."""
    point = find_resume_point(cfg.train.out) if resume is True else resume
    if isinstance(point, ResumePoint):
        report_changes(point.config, cfg)
        return point
    return bool(resume)


def _train(
    cfg: Config,
    train_data: Dataset,
    valid_data: Dataset,
    tokenizer: Tokenizer | None,
    make_model: Callable[[Config, torch.device, ParallelDims], GPT],
    resume: ResumePoint | bool,
    progress: bool,
    started: float,
) -> RunSummary:
    """What every run does once its data are ready: device, processes, model, trainer, resume, fit, summary."""
    tc = cfg.train
    device = resolve_device(tc.device)
    if (slow := precision_warning(device, tc.precision)) is not None:
        warnings.warn(slow, stacklevel=3)
    if device.type == "cpu":
        reuse_freed_cpu_memory()
    lock = guard_run(tc.out, device)  # before anything is written: this job's directory alone
    try:
        dims = init_distributed(cfg.parallel, device)  # torchrun: one process per device
        model = make_model(cfg, dims.device, dims)
        trainer = Trainer(cfg, model, train_data, valid_data, tokenizer=tokenizer, dims=dims, progress=progress)
        if resume:
            step_dir = trainer.resume(resume) if isinstance(resume, ResumePoint) else None  # searched already
            if trainer.is_main:
                print(f"resuming from {step_dir}" if step_dir
                      else f"no checkpoint in {trainer.out}: starting from step 0")
        trainer.fit(started)
        destroy_distributed()  # the collectives are over; what follows is per process
    finally:
        if lock is not None:
            lock.release()
    valid = [r["loss"] for r in read_log(trainer.out / LOG_FILE) if r["kind"] == "valid"]
    plot = _plot(trainer) if trainer.is_main else None
    return RunSummary(trainer.out, trainer.state.step, trainer.state.step >= tc.steps, trainer.state.skipped_steps,
                      valid[0] if valid else None, valid[-1] if valid else None, plot)
