"""Training checkpoints: what an exact resume needs beside the model files (DCP model + optimizer
state that reshards on load, every rank's random generators, the trainer's counters, the layout).

Every function here is collective under torch.distributed: every rank calls it.
"""

from __future__ import annotations

import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from mtnlg.checkpoint.directory import (
    LAYOUT_FILE,
    RNG_DIR,
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
    rank its RNG file, rank 0 the rest. ``trainer_state`` must be JSON-serialisable.
    """
    run_dir = Path(run_dir)
    target = run_dir / step_dir_name(step)
    staging = temp_path(target)  # a fixed name: every rank writes its shards into rank 0's directory
    main = rank_info.is_main()
    if main:
        fresh_dir(target)
    rank_info.barrier()
    try:
        model_state, optim_state = get_state_dict(model, optimizer, options=_STATE_OPTIONS)
        dcp_call(dcp.save, {"model": model_state, "optim": optim_state}, staging / TRAIN_STATE_DIR)
        (staging / RNG_DIR).mkdir(exist_ok=True)
        torch.save(rng_state(), staging / RNG_DIR / f"rank_{rank_info.rank():05d}.pt")
        if weights:
            save_consolidated_weights(model, staging)
        if main:
            write_model_files(staging, None, cfg, tokenizer)
            write_json(staging / TRAINER_FILE, trainer_state)
            write_json(staging / LAYOUT_FILE, run_layout(cfg))
        rank_info.barrier()
        write_checksums(staging)
        if main:
            commit_dir(staging, target)
            point_latest(run_dir, target)
            prune(run_dir, keep_last)
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    rank_info.barrier()
    return target


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
