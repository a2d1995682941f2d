"""Training checkpoints: what an exact resume needs beside the model files (DCP model + optimizer
state that reshards on load, every rank's random generators, the trainer's counters, the layout).

Every function here is collective under torch.distributed: every rank calls it.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from mtnlg.checkpoint.directory import (
    LATEST_FILE,
    LAYOUT_FILE,
    RNG_DIR,
    STEP_DIR,
    TRAIN_STATE_DIR,
    TRAINER_FILE,
    CheckpointError,
    find_training_checkpoint,
    point_latest,
    prune,
    step_dir_name,
    write_checksums,
)
from mtnlg.checkpoint.model import dcp_call, load_config, save_consolidated_weights, write_model_files
from mtnlg.checkpoint.writer import AsyncWriter
from mtnlg.config import Config, ModelConfig, runtime_fields
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT
from mtnlg.parallel.dims import ParallelDims
from mtnlg.util import dist as rank_info
from mtnlg.util.fs import commit_dir, fresh_dir, read_json, temp_path, write_json

# Flattened optimizer state ("state.blocks.3.mlp.fc_in.weight.exp_avg", "param_groups.<name>.lr"):
# keyed by parameter name, so pipeline stages, each holding other parameters, do not overwrite each
# other's param_groups, and a checkpoint loads under any layout.
_STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# DCP's note that it saves "in a single process" when torch.distributed is not initialized: meant
# so in one process, and an asynchronous save says it from its writer thread, where a
# catch_warnings of the caller does not reach.
warnings.filterwarnings("ignore", message="torch.distributed is .*single process")



def run_layout(cfg: Config) -> dict[str, Any]:
    """The layout of this job as ``layout.json`` records it: the world size and the ``parallel.*``
    sizes and schedule, ``dp = -1`` resolved. For reading only: a checkpoint loads under any layout."""
    world = rank_info.world_size()
    layout = {"world_size": world, **{k: v for k, v in cfg.to_dict()["parallel"].items() if k != "timeout_s"}}
    layout["dp"] = ParallelDims.from_config(cfg.parallel, world).dp  # dp = -1 resolved as the run resolved it
    return layout


def rng_state() -> dict[str, Any]:
    """Every generator a training step can draw from, in a form ``torch.load(weights_only=True)`` reads."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    tokenizer: Tokenizer | None,
    trainer_state: dict[str, Any],
    keep_last: int = 0,
    weights: bool = True,
) -> Path:
    """Write ``run_dir/step_XXXXXXXX`` atomically, point ``latest`` at it, keep the newest ``keep_last``.

    ``weights``: also write the consolidated ``model.safetensors`` (a run does at its last save).

    Collective under torch.distributed: every rank calls it; DCP writes each rank's shards and each
    rank its RNG file, rank 0 the rest. ``trainer_state`` must be JSON-serialisable. A full disk
    raises NoSpaceError (the previous checkpoint is untouched).
    """
    run_dir = Path(run_dir)
    target, staging = _begin(run_dir, step)
    with _cleanup_on_failure(run_dir, step, staging):
        model_state, optim_state = get_state_dict(model, optimizer, options=_STATE_OPTIONS)
        dcp_call(dcp.save, {"model": model_state, "optim": optim_state}, staging / TRAIN_STATE_DIR)
        _agree(lambda: _write_files(staging, cfg, tokenizer, trainer_state, rng_state(),
                                    model if weights else None))
        _commit(run_dir, target, staging, keep_last)
    rank_info.barrier()
    return target


def save_training_checkpoint_async(
    run_dir: str | Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    tokenizer: Tokenizer | None,
    trainer_state: dict[str, Any],
    keep_last: int,
    writer: AsyncWriter,
) -> Future[Path]:
    """``save_training_checkpoint`` without the weights, returning once the state is staged.

    DCP's ``async_save`` copies model and optimizer state to CPU memory (shared, and pinned on
    CUDA) and, in a background thread, plans the write and has ``writer``'s process write the data
    files (``AsyncWriter.kind``); ``writer``'s one thread then writes the RNG and trainer files, the
    checksums, and commits the step (rename, ``latest``, pruning) only when every rank's write
    has finished. Until then the step is a ``.step_XXXXXXXX.tmp`` directory that resume never
    reads. The background collectives run on ``writer.group`` (gloo), not the training's.
    Collective: every rank calls it; the caller waits for the previous future first.
    """
    run_dir = Path(run_dir)
    target, staging = _begin(run_dir, step)
    rng = rng_state()  # this step's generators, before training draws from them again
    trainer_state = copy.deepcopy(trainer_state)  # this step's counters, whatever the caller does next
    with _cleanup_on_failure(run_dir, step, staging):
        model_state, optim_state = get_state_dict(model, optimizer, options=_STATE_OPTIONS)
        writer.check_space({"model": model_state, "optim": optim_state}, step)
        written = dcp.async_save({"model": model_state, "optim": optim_state},
                                 checkpoint_id=staging / TRAIN_STATE_DIR, process_group=writer.group,
                                 async_stager=writer.stager, no_dist=not rank_info.distributed(),
                                 **writer.save_options(staging / TRAIN_STATE_DIR))

    def finish() -> Path:
        with _cleanup_on_failure(run_dir, step, staging):
            written.result()
            _agree(lambda: _write_files(staging, cfg, tokenizer, trainer_state, rng, None), writer.group)
            _commit(run_dir, target, staging, keep_last, writer.group, writer.digests(staging))
        return target

    return writer.executor.submit(finish)


def _begin(run_dir: Path, step: int) -> tuple[Path, Path]:
    """The step directory and its empty staging sibling (a fixed name: every rank writes its shards
    into the directory rank 0 made)."""
    target = run_dir / step_dir_name(step)
    if rank_info.is_main():
        fresh_dir(target)
    rank_info.barrier()
    return target, temp_path(target)


def _write_files(staging: Path, cfg: Config, tokenizer: Tokenizer | None, trainer_state: dict[str, Any],
                 rng: dict[str, Any], model: GPT | None) -> None:
    """Everything beside ``train_state/``: this rank's RNG file, rank 0 the config, tokenizer,
    trainer and layout files; with ``model``, the consolidated weights (collective)."""
    (staging / RNG_DIR).mkdir(exist_ok=True)
    torch.save(rng, staging / RNG_DIR / f"rank_{rank_info.rank():05d}.pt")
    if model is not None:
        save_consolidated_weights(model, staging)
    if rank_info.is_main():
        write_model_files(staging, None, cfg, tokenizer)
        write_json(staging / TRAINER_FILE, trainer_state)
        write_json(staging / LAYOUT_FILE, run_layout(cfg))


def _agree(write: Callable[[], None], group: Any = None) -> None:
    """Run this rank's ``write``, then learn whether every rank's succeeded (one all-reduce in place
    of a barrier): a rank whose disk filled up must not leave the others waiting for it."""
    failure: BaseException | None = None
    try:
        write()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
        failure = exc
    if rank_info.distributed():
        flag = torch.tensor([float(failure is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if failure is None and flag.item():
            raise CheckpointError("another rank failed to write its part of the checkpoint")
    if failure is not None:
        raise failure


def _commit(run_dir: Path, target: Path, staging: Path, keep_last: int, group: Any = None,
            known: dict[str, str] | None = None) -> None:
    """Checksums (collective; ``known``: the digests a writer process computed), then rank 0 renames
    the step into place, names it in ``latest`` and prunes."""
    write_checksums(staging, group=group, known=known)
    if rank_info.is_main():
        commit_dir(staging, target)
        point_latest(run_dir, target)
        prune(run_dir, keep_last)


@contextlib.contextmanager
def _cleanup_on_failure(run_dir: Path, step: int, staging: Path) -> Iterator[None]:
    """On any failure rank 0 removes the staging directory (the last good step is untouched);
    a full disk becomes NoSpaceError naming the step that is kept."""
    try:
        yield
    except BaseException as exc:
        full = no_space(exc, run_dir)
        if rank_info.is_main():
            shutil.rmtree(staging, ignore_errors=True)
        if full:
            latest = run_dir / LATEST_FILE
            kept = STEP_DIR.match(latest.read_text(encoding="utf-8").strip()) if latest.is_file() else None
            raise NoSpaceError(f"cannot save step {step} to {run_dir}: no space left on device "
                               f"({f'step {int(kept.group(1))} is kept' if kept else 'no earlier step'})") from exc
        raise


class NoSpaceError(CheckpointError):
    """A save ran out of disk; the message (one line) names the step that is kept."""


def no_space(exc: BaseException, where: Path) -> bool:
    """Whether ``exc`` (or what it wraps: a cause, DCP's per-rank failures) is a full disk.

    DCP and ``torch.save`` may report one as ``RuntimeError: [enforce fail at inline_container.cc]
    ... file write failed`` without the errno; that counts when ``where`` has under 64 MiB free."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.append(e)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()
                     if isinstance(f[0] if isinstance(f, tuple) else f, BaseException)]
    if any("write failed" in str(e) for e in seen):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(where).free < 64 << 20
    return False


def check_compatible(saved: Config, current: Config, where: Path) -> None:
    """Refuse to load a checkpoint into a different model shape; warn when the data differ."""
    def differences(section: str, skip: set[str]) -> list[str]:
        old, new = saved.to_dict()[section], current.to_dict()[section]
        return [f"{section}.{k}: checkpoint {old[k]!r}, config {new[k]!r}"
                for k in sorted(new) if k not in skip and old.get(k) != new[k]]

    model_diffs = differences("model", runtime_fields(ModelConfig))
    if model_diffs:
        raise CheckpointError(f"{where} does not fit this config: " + "; ".join(model_diffs))
    data_diffs = differences("data", set())
    if data_diffs:
        warnings.warn(f"{where}: the data settings changed, so the saved data position refers to other "
                      "samples: " + "; ".join(data_diffs), stacklevel=2)


def _checkpoint_names(model: GPT, optim_state: dict[str, Any]) -> dict[str, str]:
    """Optimizer entries to read under another name: a pipeline's tied copy of the embedding.

    A model whose output layer shares the embedding's weight keeps that weight's optimizer state
    under ``wte.weight`` only; the last pipeline stage's copy (``lm_head.weight``) takes the same
    values, so it reads those, whichever layout wrote the checkpoint.
    """
    if not (model.cfg.tie_embeddings and model.wte is None and model.lm_head is not None):
        return {}
    return {k: k.replace(".lm_head.weight.", ".wte.weight.") for k in optim_state if ".lm_head.weight." in k}


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from, found and verified once, and the config it was saved with."""

    step_dir: Path
    config: Config


def find_resume_point(run_dir: str | Path) -> ResumePoint | None:
    """``latest`` of ``run_dir``, or the newest older step that passes its checksums (with a warning),
    with its config read once; None when the run has no checkpoint yet."""
    step_dir = find_training_checkpoint(run_dir)
    return None if step_dir is None else ResumePoint(step_dir, load_config(step_dir))


def load_training_checkpoint(
    step_dir: Path, model: GPT, optimizer: torch.optim.Optimizer, cfg: Config, saved: Config | None = None
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNGs from ``step_dir`` (saved with config ``saved``,
    read from it when not given); return the saved trainer state."""
    check_compatible(saved or load_config(step_dir), cfg, step_dir)
    model_state, optim_state = get_state_dict(model, optimizer, options=_STATE_OPTIONS)
    names = _checkpoint_names(model, optim_state)
    state = {"model": model_state, "optim": {names.get(k, k): v for k, v in optim_state.items()}}
    dcp_call(dcp.load, state, step_dir / TRAIN_STATE_DIR)
    optim_state = {k: state["optim"][names.get(k, k)] for k in optim_state}
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state,
                   options=_STATE_OPTIONS)
    rng_file = step_dir / RNG_DIR / f"rank_{rank_info.rank():05d}.pt"
    if not rng_file.is_file():  # the run had fewer ranks: continue rank 0's streams, so that tensor-
        rng_file = step_dir / RNG_DIR / "rank_00000.pt"  # parallel peers keep drawing the same masks
    set_rng_state(torch.load(rng_file, weights_only=True))
    return read_json(step_dir / TRAINER_FILE, CheckpointError)
