"""Checkpoint directories: their file names, finding the one meant, checksums (written once, checked
on load), and the step directories of a run.

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
temporary name, fsynced and renamed only when complete (``mtnlg.util.fs``), then ``latest`` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mtnlg.util import dist as rank_info
from mtnlg.util.fs import read_json, sha256, write_json, write_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INT8_WEIGHTS_FILE = "model-int8.safetensors"  # an int8 checkpoint's weights instead (mtnlg.generate.quantize)
INT4_WEIGHTS_FILE = "model-int4.safetensors"  # an int4 checkpoint's weights instead (mtnlg.generate.quantize)
TOKENIZER_DIR = "tokenizer"
LATEST_FILE = "latest"
TRAIN_STATE_DIR = "train_state"
TRAINER_FILE = "trainer.json"
LAYOUT_FILE = "layout.json"
RNG_DIR = "rng"
CHECKSUM_FILE = "checksums.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the requested model."""


# -- finding a checkpoint ----------------------------------------------------------------------------


def resolve(path: str | Path) -> Path:
    """The checkpoint directory meant by ``path``: itself, or a run directory's ``latest`` step."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        step_dir = path / read_latest(path)
        if (step_dir / CONFIG_FILE).is_file():
            return step_dir
        raise CheckpointError(f"{latest} names {step_dir.name}, which is missing or incomplete")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path} is not a checkpoint: no {CONFIG_FILE} and no {LATEST_FILE} file")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def point_latest(run_dir: Path, step_dir: Path) -> None:
    """Make ``run_dir/latest`` name ``step_dir`` (atomically: a reader sees the old or the new name)."""
    write_text(run_dir / LATEST_FILE, step_dir.name)


def read_latest(run_dir: Path) -> str:
    """The step directory name in ``run_dir/latest``. Only a ``step_N`` name is accepted: the file
    is followed as a path, and ``../..`` or ``/etc`` would lead out of the run directory."""
    latest = run_dir / LATEST_FILE
    name = latest.read_text(encoding="utf-8").strip()
    if not STEP_DIR.match(name):
        raise CheckpointError(f"{latest} names {name[:80]!r}, which is not a step directory of the run (step_N)")
    return name


def _step_dirs(run_dir: Path) -> list[Path]:
    """Step directories, newest first."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _candidates(run_dir: Path) -> list[Path]:
    """A run's checkpoints in the order to try them: the one ``latest`` names, then newest first."""
    candidates = _step_dirs(run_dir) if run_dir.is_dir() else []
    latest_file = run_dir / LATEST_FILE
    if latest_file.is_file():
        named = run_dir / read_latest(run_dir)
        candidates = [named] + [c for c in candidates if c != named]
    return candidates


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step directories (0 keeps all), and stale temporaries."""
    for stale in run_dir.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    latest = read_latest(run_dir)
    for old in _step_dirs(run_dir)[keep_last:]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def find_training_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``latest``, or, if it is incomplete (no ``train_state/`` or
    ``trainer.json``, e.g. after a tool wrote into it) or fails its checksums, the newest older one
    that passes (with a warning). None when ``run_dir`` has no checkpoint at all."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    candidates = _candidates(run_dir)
    return _first_good(run_dir, candidates, _check_resumable) if candidates else None


def _check_resumable(step_dir: Path) -> None:
    """What ``--resume`` reads is there (on every rank alike: no collective before it), then checksums."""
    missing = [name for name in (TRAIN_STATE_DIR, TRAINER_FILE) if not (step_dir / name).exists()]
    if missing:
        raise CheckpointError(f"{step_dir} is incomplete: no {' and no '.join(missing)}")
    verify_checksums(step_dir)


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
    has_weights = (directory / WEIGHTS_FILE).is_file()
    names = [n for n in _read_manifest(manifest) if _loaded_for_inference(n, has_weights)]
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



# -- checksums -------------------------------------------------------------------------------------------


def _files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE
    )


def _hash_share(directory: Path, names: list[str], local: bool = False, group: Any = None) -> dict[str, str | None]:
    """SHA-256 of every file named, None for a missing one, the reading split across the ranks.

    Collective under torch.distributed (unless ``local``): rank r hashes names r, r + world, ...
    and the digests are gathered, so a checkpoint of hundreds of shards is read once in total, not
    once per rank and not all by rank 0. Every rank must pass the same names (the directory is on a
    shared filesystem, as DCP requires). ``group``: the process group to gather over (default: all).
    """
    collective = not local and rank_info.distributed()
    world, rank = (rank_info.world_size(), rank_info.rank()) if collective else (1, 0)
    mine = {name: sha256(directory / name) if (directory / name).is_file() else None for name in names[rank::world]}
    if world == 1:
        return mine
    parts: list[dict[str, str | None]] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine, group=group)
    return {name: digest for part in parts for name, digest in part.items()}


def write_checksums(directory: Path, local: bool = False, group: Any = None,
                    known: dict[str, str] | None = None) -> None:
    """Hash every file into ``checksums.json``, the one manifest writer of every checkpoint.

    Collective (see ``_hash_share``; rank 0 writes the file) unless ``local``: a directory that
    one process writes alone (an inference checkpoint, an export, a conversion). ``group``: the
    process group of the collective (an asynchronous save's own, beside the training's).
    ``known``: digests this rank has already (by name under ``directory``: the files a checkpoint
    writer process hashed as it wrote them), not read again; every rank passes a dict or none does.
    """
    collective = not local and rank_info.distributed()
    names = _files(directory)
    if known is not None and collective:
        parts: list[dict[str, str]] = [{} for _ in range(rank_info.world_size())]
        dist.all_gather_object(parts, known, group=group)
        known = {name: digest for part in parts for name, digest in part.items()}
    known = {name: digest for name, digest in (known or {}).items() if name in names}
    sums = {**_hash_share(directory, [n for n in names if n not in known], local=not collective, group=group),
            **known}
    if not collective or rank_info.is_main():
        write_json(directory / CHECKSUM_FILE, sums, sort_keys=True)
    if collective:
        dist.barrier(group=group)  # no rank reads the manifest before it exists


def _read_manifest(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was not completely written")
    sums = read_json(path, CheckpointError)
    if not isinstance(sums, dict):
        raise CheckpointError(f"{path}: expected a JSON object of file names and SHA-256 digests")
    return sums


def verify_checksums(directory: Path, only: Callable[[str], bool] | None = None) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file (the same error on
    every rank); collective, see ``_hash_share``. ``only`` limits the check to the names it accepts."""
    sums = _read_manifest(directory / CHECKSUM_FILE)
    names = sorted(n for n in sums if only is None or only(n))
    found = _hash_share(directory, names)
    for name in names:
        if found[name] is None:
            raise CheckpointError(f"{directory / name} is missing")
        if found[name] != sums[name]:
            raise CheckpointError(
                f"{directory / name} is corrupted or truncated: its SHA-256 differs from {CHECKSUM_FILE}"
            )
