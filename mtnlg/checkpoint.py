"""Checkpoint directories: self-contained, written atomically, verified on load.

A checkpoint directory holds everything generation, serving, evaluation and conversion need::

    config.json          the full Config (model shape, and the recipe that produced it)
    model.safetensors    consolidated model weights (tied output layer stored once); a training
                         run writes it at its last save (and when a job stops early) only, and
                         `mtnlg checkpoint export` on demand: loading a step without it reads
                         the weights from train_state/
    tokenizer/           the tokenizer the model was trained with

A training checkpoint adds what an exact resume needs::

    train_state/         model + optimizer state, torch.distributed.checkpoint (DCP) format, so a
                         later run with another parallel layout can reshard it on load
    trainer.json         step, consumed samples/tokens, skipped steps, data-loader position, loss scaler
    layout.json          the parallel layout that wrote it (world size, dp, pp, tp, pipeline schedule, ...)
    rng/rank_00000.pt    every random generator of each rank (Python, NumPy, torch CPU and CUDA)
    checksums.json       SHA-256 of every other file, written last

A run directory (``mtnlg train --out``) holds one such directory per step (``step_00000100``)
and a ``latest`` file naming the newest complete one. Every directory is written under a
temporary name, fsynced and renamed only when complete, then ``latest`` is replaced atomically,
so a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from mtnlg.config import Config
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
LATEST_FILE = "latest"
TRAIN_STATE_DIR = "train_state"
TRAINER_FILE = "trainer.json"
LAYOUT_FILE = "layout.json"
RNG_DIR = "rng"
CHECKSUM_FILE = "checksums.json"
STEP_DIR = re.compile(r"^step_(\d+)$")

# Model fields that change the parameters' shapes or meaning: a checkpoint cannot be loaded across them.
# (dropout and activation checkpointing change neither and may differ on resume.)
_RESUMABLE_MODEL_FIELDS = {"dropout", "activation_checkpointing"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the requested model."""


# -- atomic directories ------------------------------------------------------------------------------


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(target: Path) -> Path:
    """The temporary sibling a directory is written into; fixed, so every rank of a job finds it."""
    return target.with_name(f".{target.name}.tmp")


def _commit(staging: Path, target: Path) -> None:
    """Sync ``staging`` and rename it to ``target``, replacing an existing ``target`` only then."""
    _fsync_tree(staging)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync_dir(target.parent)


def _fresh_staging(target: Path) -> Path:
    staging = staging_dir(target)
    shutil.rmtree(staging, ignore_errors=True)  # left over by a writer that was killed
    staging.mkdir(parents=True)
    return staging


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``target`` by letting ``fill`` write into a temporary sibling, then rename.

    An existing ``target`` is replaced only after the new one is complete and synced.
    """
    target = Path(target)
    staging = _fresh_staging(target)
    try:
        fill(staging)
        _commit(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# -- inference checkpoints -----------------------------------------------------------------------------


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
    if not _distributed():
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
    if _rank() == 0:  # consolidated by rank 0 as the writer's last step, ranks held back until it is done
        (parts / "model-00001-of-00001.safetensors").rename(directory / WEIGHTS_FILE)
        shutil.rmtree(parts)
    _barrier()


def save_model(directory: str | Path, model: GPT, cfg: Config, tokenizer: Tokenizer | None = None) -> Path:
    """Save a self-contained inference checkpoint atomically, with its ``checksums.json``."""
    weights = model_state_for_saving(model)

    def fill(tmp: Path) -> None:
        write_model_files(tmp, weights, cfg, tokenizer)
        write_manifest(tmp)

    return write_atomically(Path(directory), fill)


def write_manifest(directory: Path) -> None:
    """``checksums.json`` of an inference checkpoint written by one process (the collective
    ``write_checksums`` is for training checkpoints)."""
    sums = {name: _sha256(directory / name) for name in _files(directory)}
    (directory / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True), encoding="utf-8")


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
        hint = " (an int8 checkpoint: load it with mtnlg.quantize.load_for_inference)" if any(
            directory.glob("model-int8*.safetensors")) else ""
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


# -- verification on load --------------------------------------------------------------------------------

# Files verified in this process, by (path, size, modification time): loading the same unchanged
# checkpoint again (e.g. config first, then the model) does not read it twice.
_VERIFIED: set[tuple[str, int, int]] = set()
_UNVERIFIABLE: set[str] = set()  # directories without a manifest, already warned about


def _loaded_for_inference(name: str, has_weights: bool) -> bool:
    """The files inference reads: not a training checkpoint's RNGs, nor its ``train_state/`` unless the
    weights come from there (a step saved without ``model.safetensors``)."""
    return name == CONFIG_FILE or name.startswith(f"{TOKENIZER_DIR}/") or (
        name.startswith("model") and name.endswith(".safetensors")) or (
        not has_weights and name.startswith(f"{TRAIN_STATE_DIR}/"))


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def verify_for_inference(directory: Path) -> None:
    """Check the files inference loads against ``checksums.json`` (CheckpointError naming a file that
    differs, is truncated or missing). A checkpoint without a manifest (written before checkpoints
    had one) loads with a warning."""
    manifest = directory / CHECKSUM_FILE
    if not manifest.is_file():
        if str(directory.resolve()) in _UNVERIFIABLE:  # said once per directory
            return
        _UNVERIFIABLE.add(str(directory.resolve()))
        warnings.warn(f"{directory} has no {CHECKSUM_FILE}: its files cannot be verified (save it again to add one)",
                      stacklevel=3)
        return
    try:
        has_weights = (directory / WEIGHTS_FILE).is_file()
        names = [n for n in json.loads(manifest.read_text(encoding="utf-8")) if _loaded_for_inference(n, has_weights)]
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest}: invalid JSON: {exc}") from None
    unverified = {n for n in names if not (directory / n).is_file() or _stamp(directory / n) not in _VERIFIED}
    if unverified:
        verify_checksums(directory, only=unverified.__contains__)
        _VERIFIED.update(_stamp(directory / n) for n in unverified)


def resolve_verified(path: str | Path) -> Path:
    """``resolve``, then ``verify_for_inference``. A run directory falls back, with a warning, from a
    ``latest`` step that is missing, incomplete or fails its checksums to the newest step that passes,
    as ``--resume`` does."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() or not (path / LATEST_FILE).is_file() and not path.is_dir():
        directory = resolve(path)
        verify_for_inference(directory)
        return directory

    def check(candidate: Path) -> None:
        if not (candidate / CONFIG_FILE).is_file():
            raise CheckpointError(f"{candidate} is missing or incomplete")
        verify_for_inference(candidate)

    candidates = _candidates(path)
    if not candidates:
        resolve(path)  # raises: not a checkpoint
    return _first_good(path, candidates, check)


def _first_good(run_dir: Path, candidates: list[Path], check: Callable[[Path], None]) -> Path:
    """The first candidate ``check`` passes, warning about those it skipped; else a CheckpointError."""
    problems = []
    for candidate in candidates:
        try:
            check(candidate)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            warnings.warn(f"using the previous good checkpoint {candidate}: {'; '.join(problems)}", stacklevel=3)
        return candidate
    raise CheckpointError(f"no usable checkpoint in {run_dir}: {'; '.join(problems)}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


# -- checksums -------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE
    )


def _hash_share(directory: Path, names: list[str]) -> dict[str, str | None]:
    """SHA-256 of every file named, None for a missing one, the reading split across the ranks.

    Collective under torch.distributed: rank r hashes names r, r + world, ... and the digests are
    gathered, so a checkpoint of hundreds of shards is read once in total, not once per rank and
    not all by rank 0. Every rank must pass the same names (the directory is on a shared filesystem,
    as DCP requires).
    """
    world = dist.get_world_size() if _distributed() else 1
    mine = {
        name: _sha256(directory / name) if (directory / name).is_file() else None
        for name in names[_rank() :: world]
    }
    if world == 1:
        return mine
    parts: list[dict[str, str | None]] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine)
    return {name: digest for part in parts for name, digest in part.items()}


def write_checksums(directory: Path) -> None:
    """Hash every file into ``checksums.json`` (written by rank 0); collective, see ``_hash_share``."""
    sums = _hash_share(directory, _files(directory))
    if _rank() == 0:
        (directory / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True), encoding="utf-8")
    _barrier()  # no rank reads the manifest before it exists


def verify_checksums(directory: Path, only: Callable[[str], bool] | None = None) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file (the same error on
    every rank); collective, see ``_hash_share``. ``only`` limits the check to the names it accepts."""
    path = directory / CHECKSUM_FILE
    try:
        sums = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint was not completely written") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from None
    names = sorted(n for n in sums if only is None or only(n))
    found = _hash_share(directory, names)
    for name in names:
        if found[name] is None:
            raise CheckpointError(f"{directory / name} is missing")
        if found[name] != sums[name]:
            raise CheckpointError(
                f"{directory / name} is corrupted or truncated: its SHA-256 differs from {CHECKSUM_FILE}"
            )


# -- training checkpoints --------------------------------------------------------------------------------


# Flattened optimizer state ("state.blocks.3.mlp.fc_in.weight.exp_avg", "param_groups.<name>.lr"):
# keyed by parameter name, so pipeline stages, each holding other parameters, do not overwrite each
# other's param_groups, and a checkpoint loads under any layout.
_STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _dcp(fn: Callable[..., Any], state: dict[str, Any], path: Path, local: bool = False) -> None:
    """DCP save/load (``local``: by this process alone); in one process without its one-process warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        fn(state, checkpoint_id=path, no_dist=local or not _distributed())


def consolidated_weights(train_state: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The whole model's weights read back from a DCP ``train_state`` directory, in this process alone
    (whatever layout wrote it): for ``mtnlg checkpoint export`` and loading a step saved without
    ``model.safetensors``."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    _dcp(dcp.load, state, train_state, local=True)
    return model_state_for_saving(model)


def run_layout(cfg: Config) -> dict[str, Any]:
    """The layout of this job as ``layout.json`` records it: the world size and the ``parallel.*``
    sizes and schedule, ``dp = -1`` resolved. For reading only: a checkpoint loads under any layout."""
    from mtnlg.parallel.dims import ParallelDims  # here: mtnlg.parallel imports this module

    world = dist.get_world_size() if _distributed() else 1
    layout = {"world_size": world, **{k: v for k, v in cfg.to_dict()["parallel"].items() if k != "timeout_s"}}
    layout["dp"] = ParallelDims.from_config(cfg.parallel, world).dp  # dp = -1 resolved as the run resolved it
    return layout


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


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
    staging = staging_dir(target)
    main = _rank() == 0
    if main:
        _fresh_staging(target)
    _barrier()
    try:
        model_state, optim_state = get_state_dict(model, optimizer, options=_STATE_OPTIONS)
        _dcp(dcp.save, {"model": model_state, "optim": optim_state}, staging / TRAIN_STATE_DIR)
        (staging / RNG_DIR).mkdir(exist_ok=True)
        torch.save(rng_state(), staging / RNG_DIR / f"rank_{_rank():05d}.pt")
        if weights:
            save_consolidated_weights(model, staging)
        if main:
            write_model_files(staging, None, cfg, tokenizer)
            (staging / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
            (staging / LAYOUT_FILE).write_text(json.dumps(run_layout(cfg), indent=1), encoding="utf-8")
        _barrier()
        write_checksums(staging)
        if main:
            _commit(staging, target)
            _write_text_atomically(run_dir / LATEST_FILE, target.name)
            prune(run_dir, keep_last)
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _barrier()
    return target


def _step_dirs(run_dir: Path) -> list[Path]:
    """Step directories, newest first."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _candidates(run_dir: Path) -> list[Path]:
    """A run's checkpoints in the order to try them: the one ``latest`` names, then newest first."""
    candidates = _step_dirs(run_dir) if run_dir.is_dir() else []
    latest_file = run_dir / LATEST_FILE
    if latest_file.is_file():
        named = run_dir / latest_file.read_text(encoding="utf-8").strip()
        candidates = [named] + [c for c in candidates if c != named]
    return candidates


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step directories (0 keeps all), and stale temporaries."""
    for stale in run_dir.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    latest = (run_dir / LATEST_FILE).read_text(encoding="utf-8").strip()
    for old in _step_dirs(run_dir)[keep_last:]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def find_training_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``latest``, or, if it fails its checksums, the newest older one
    that passes (with a warning). None when ``run_dir`` has no checkpoint at all."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    candidates = _candidates(run_dir)
    return _first_good(run_dir, candidates, verify_checksums) if candidates else None


def check_compatible(saved: Config, current: Config, where: Path) -> None:
    """Refuse to load a checkpoint into a different model shape; warn when the data differ."""
    def differences(section: str, skip: set[str]) -> list[str]:
        old, new = saved.to_dict()[section], current.to_dict()[section]
        return [f"{section}.{k}: checkpoint {old[k]!r}, config {new[k]!r}"
                for k in sorted(new) if k not in skip and old.get(k) != new[k]]

    model_diffs = differences("model", _RESUMABLE_MODEL_FIELDS)
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


def load_training_checkpoint(
    step_dir: Path, model: GPT, optimizer: torch.optim.Optimizer, cfg: Config
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNGs from ``step_dir``; return the saved trainer state."""
    check_compatible(load_config(step_dir), cfg, step_dir)
    model_state, optim_state = get_state_dict(model, optimizer, options=_STATE_OPTIONS)
    names = _checkpoint_names(model, optim_state)
    state = {"model": model_state, "optim": {names.get(k, k): v for k, v in optim_state.items()}}
    _dcp(dcp.load, state, step_dir / TRAIN_STATE_DIR)
    optim_state = {k: state["optim"][names.get(k, k)] for k in optim_state}
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state,
                   options=_STATE_OPTIONS)
    rng_file = step_dir / RNG_DIR / f"rank_{_rank():05d}.pt"
    if not rng_file.is_file():  # the run had fewer ranks: continue rank 0's streams, so that tensor-
        rng_file = step_dir / RNG_DIR / "rank_00000.pt"  # parallel peers keep drawing the same masks
    set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((step_dir / TRAINER_FILE).read_text(encoding="utf-8"))
