"""Where a writer may write: the one check every command that writes a directory makes first.

``quantize``, ``convert --from-hf``/``--to-hf``/``--upcycle`` replace their ``--out`` as a whole
(atomically: ``mtnlg.util.fs.atomic_dir``), so before anything is read or written, ``--out``
must be absent or empty, or, with ``overwrite``, a directory of the kind the writer makes (an
int8 checkpoint over an int8 checkpoint; never a run directory, a training step, a home
directory or a folder of notes). It must not be, lie inside, or hold one of the writer's
sources: replacing it would destroy what is being read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from mtnlg.checkpoint.directory import (
    CONFIG_FILE,
    INT4_WEIGHTS_FILE,
    INT8_WEIGHTS_FILE,
    LATEST_FILE,
    TRAIN_STATE_DIR,
    WEIGHTS_FILE,
    CheckpointError,
)
from mtnlg.model.hf import FAMILIES


def _config(directory: Path) -> dict:
    try:
        data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _model_checkpoint(directory: Path, weights: str) -> bool:
    """An mtnlg model directory with ``weights``: no training state, not a run directory."""
    return (isinstance(_config(directory).get("model"), dict) and (directory / weights).is_file()
            and not (directory / TRAIN_STATE_DIR).exists() and not (directory / LATEST_FILE).exists())


MODEL, HF = "model checkpoint", "Hugging Face directory"
INT8, INT4 = "quantized (int8) checkpoint", "quantized (int4) checkpoint"
KINDS: dict[str, Callable[[Path], bool]] = {  # what each kind of output directory holds
    MODEL: lambda d: _model_checkpoint(d, WEIGHTS_FILE) and not (d / INT8_WEIGHTS_FILE).exists(),
    INT8: lambda d: _model_checkpoint(d, INT8_WEIGHTS_FILE),
    INT4: lambda d: _model_checkpoint(d, INT4_WEIGHTS_FILE),
    HF: lambda d: _hf_model_type(_config(d)) in FAMILIES and (d / WEIGHTS_FILE).is_file(),
}


def _hf_model_type(config: dict) -> str | None:
    """The family of an HF ``config.json`` as import reads it (GPT-2 files may lack ``model_type``)."""
    return config.get("model_type") or ("gpt2" if "n_embd" in config else None)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(out: str | Path, kind: str, sources: Iterable[str | Path | None], overwrite: bool = False) -> Path:
    """Refuse ``out`` unless a writer of ``kind`` may replace it (see the module's docstring);
    one line naming the directory and why."""
    target = Path(out).expanduser().resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if _within(target, src) or _within(src, target):
            raise CheckpointError(f"--out {out} {'is' if target == src else 'overlaps'} the source {source}: "
                                  "write into another directory")
    if not target.exists():
        return target
    if not target.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")
    if not any(target.iterdir()):
        return target
    if not KINDS[kind](target):
        raise CheckpointError(f"--out {out} exists, is not empty and is not a {kind}, so it is not replaced: "
                              "write into a new or empty directory")
    if not overwrite:
        raise CheckpointError(f"--out {out} already holds a {kind}: give --overwrite to replace it")
    return target
