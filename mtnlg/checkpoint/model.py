"""Model files: the consolidated weights, config and tokenizer a checkpoint is loaded from.

Inference, conversion, fine-tuning and ``mtnlg checkpoint export`` read and write these; the
exact-resume state beside them is ``mtnlg.checkpoint.training``'s.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mtnlg.checkpoint.directory import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    TRAIN_STATE_DIR,
    WEIGHTS_FILE,
    CheckpointError,
    resolve,
    resolve_verified,
    write_checksums,
)
from mtnlg.config import Config, config_from_dict
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT
from mtnlg.util import dist as rank_info
from mtnlg.util.fs import atomic_dir, read_json


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """Full, contiguous CPU tensors, the tied output weight dropped (safetensors refuses shared storage).

    ``get_model_state_dict(full_state_dict=True)`` gathers sharded (DTensor/FSDP) parameters too,
    so a parallel run writes the same consolidated file as a single process.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_model_files(
    directory: Path, weights: dict[str, torch.Tensor] | None, cfg: Config, tokenizer: Tokenizer | None
) -> None:
    """Write config, weights (from ``model_state_for_saving``; None: none) and tokenizer into an
    existing directory."""
    (directory / CONFIG_FILE).write_text(cfg.to_json(), encoding="utf-8")
    if weights is not None:
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)


def save_consolidated_weights(model: GPT, directory: Path) -> None:
    """Write ``directory/model.safetensors``: the whole model's weights, the tied output layer once.

    Collective in a parallel job, which never gathers the model on one rank: each rank writes its
    own shards with DCP's Hugging Face writer (replicas once), then rank 0 copies them tensor by
    tensor into the one file, holding about two of the largest tensors in memory, not the model
    (measured on gpt2-medium, 1.4 GB of weights: 0.4 GB peak instead of 1.4 GB, in 3x the time
    of a plain write, which is why one process writes its whole model directly).
    """
    if not rank_info.distributed():
        save_file(model_state_for_saving(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    tied = model.cfg.tie_embeddings
    state = {k: v for k, v in get_model_state_dict(model).items() if not (tied and k == "lm_head.weight")}
    with torch.device("meta"):
        names = [k for k in GPT(model.cfg).state_dict() if not (tied and k == "lm_head.weight")]
    parts = directory / "weights.parts"
    writer = HuggingFaceStorageWriter(str(parts), fqn_to_index_mapping=dict.fromkeys(names, 1),
                                      save_distributed=True, enable_consolidation=True)
    dcp.save(state, storage_writer=writer)
    if rank_info.rank() == 0:  # consolidated by rank 0 as the writer's last step, ranks held back until it is done
        (parts / "model-00001-of-00001.safetensors").rename(directory / WEIGHTS_FILE)
        shutil.rmtree(parts)
    rank_info.barrier()


def save_model(directory: str | Path, model: GPT, cfg: Config, tokenizer: Tokenizer | None = None) -> Path:
    """Save a self-contained inference checkpoint atomically, with its ``checksums.json``."""
    weights = model_state_for_saving(model)

    def fill(tmp: Path) -> None:
        write_model_files(tmp, weights, cfg, tokenizer)
        write_checksums(tmp, local=True)

    return atomic_dir(directory, fill)


def load_config(path: str | Path) -> Config:
    """The Config a checkpoint was saved with (``path``: a checkpoint or a run directory)."""
    directory = resolve(path)
    return config_from_dict(read_json(directory / CONFIG_FILE, CheckpointError), source=str(directory / CONFIG_FILE))


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, Config, Tokenizer | None]:
    """Model (in eval mode), config and tokenizer (None if the checkpoint has none), from a checkpoint
    whose files pass their checksums (``resolve_verified``)."""
    directory = resolve_verified(path)
    cfg = load_config(directory)
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        state = read_safetensors(weights, device)
    elif (directory / TRAIN_STATE_DIR).is_dir():  # a training step saved without consolidated weights
        weights = directory / TRAIN_STATE_DIR
        state = {k: v.to(device) for k, v in consolidated_weights(weights, cfg).items()}
    else:
        hint = " (a quantized checkpoint: load it with mtnlg.generate.load.load_for_inference)" if any(
            directory.glob("model-int[48]*.safetensors")) else ""
        raise CheckpointError(f"{directory}: missing {WEIGHTS_FILE}{hint}")
    with torch.device("meta"):
        model = GPT(cfg.model)
    if cfg.model.tie_embeddings and "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit config.json: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as exc:  # a shape that does not fit
        raise CheckpointError(f"{weights} does not fit {directory / CONFIG_FILE}: {exc}") from None
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if dtype is not None:
        model.to(dtype)
    return model.eval(), cfg, load_tokenizer(directory)


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or malformed file is a one-line CheckpointError."""
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error type, or OSError, for a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or damaged?): {exc}") from None


def load_tokenizer(directory: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, None if it has none; a damaged one names the checkpoint."""
    tok_dir = directory / TOKENIZER_DIR
    if not tok_dir.is_dir():
        return None
    try:
        return Tokenizer.load(tok_dir)
    except Exception as exc:
        raise CheckpointError(f"{directory}: its tokenizer cannot be loaded from {tok_dir}: {exc}") from None


def dcp_call(fn: Callable[..., Any], state: dict[str, Any], path: Path, local: bool = False) -> None:
    """DCP save/load (``local``: by this process alone); in one process without its one-process warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        fn(state, checkpoint_id=path, no_dist=local or not rank_info.distributed())


def consolidated_weights(train_state: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The whole model's weights read back from a DCP ``train_state`` directory, in this process alone
    (whatever layout wrote it): for ``mtnlg checkpoint export`` and loading a step saved without
    ``model.safetensors``."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp_call(dcp.load, state, train_state, local=True)
    return model_state_for_saving(model)
