"""Checkpoint directories: self-contained, written atomically.

A checkpoint directory holds everything generation, serving, evaluation and conversion need::

    config.json          the full Config (model shape, and the recipe that produced it)
    model.safetensors    consolidated model weights (tied output layer stored once)
    tokenizer/           the tokenizer the model was trained with

A run directory (``mtnlg train --out``) holds one such directory per step (``step_00000100``)
and a ``latest`` file naming the newest complete one. Every directory is written under a
temporary name and renamed only when complete, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtnlg.config import Config
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the requested model."""


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``target`` by letting ``fill`` write into a temporary sibling, then rename.

    An existing ``target`` is replaced only after the new one is complete and synced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, the tied output weight dropped (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_model_files(directory: Path, model: GPT, cfg: Config, tokenizer: Tokenizer | None) -> None:
    """Write config, weights and tokenizer into an existing directory (no atomicity: see save_model)."""
    (directory / CONFIG_FILE).write_text(cfg.to_json(), encoding="utf-8")
    save_file(model_state_for_saving(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)


def save_model(directory: str | Path, model: GPT, cfg: Config, tokenizer: Tokenizer | None = None) -> Path:
    """Save a self-contained inference checkpoint atomically."""
    return write_atomically(Path(directory), lambda tmp: write_model_files(tmp, model, cfg, tokenizer))


def resolve(path: str | Path) -> Path:
    """The checkpoint directory meant by ``path``: itself, or a run directory's ``latest`` step."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        step_dir = path / latest.read_text(encoding="utf-8").strip()
        if (step_dir / CONFIG_FILE).is_file():
            return step_dir
        raise CheckpointError(f"{latest} names {step_dir.name}, which is missing or incomplete")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path} is not a checkpoint: no {CONFIG_FILE} and no {LATEST_FILE} file")


def load_config(path: str | Path) -> Config:
    directory = resolve(path)
    try:
        data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid JSON: {exc}") from None
    return Config.from_dict(data, source=str(directory / CONFIG_FILE))


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, Config, Tokenizer | None]:
    """Model (in eval mode), config and tokenizer (None if the checkpoint has none)."""
    directory = resolve(path)
    cfg = load_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing {WEIGHTS_FILE}")
    with torch.device("meta"):
        model = GPT(cfg.model)
    state = load_file(str(weights), device=str(device))
    if cfg.model.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit config.json: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if dtype is not None:
        model.to(dtype)
    tok_dir = directory / TOKENIZER_DIR
    tokenizer = Tokenizer.load(tok_dir) if tok_dir.is_dir() else None
    return model.eval(), cfg, tokenizer
