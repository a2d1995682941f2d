"""``mtnlg checkpoint inspect`` and ``export``: what a checkpoint holds, and its weights as one model.

Both work in one process on any checkpoint, whatever layout wrote it: ``export`` reads the
sharded ``train_state/`` (DCP reshards it into the whole model), so it also serves a checkpoint
whose ``model.safetensors`` was not written or was lost.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from mtnlg.checkpoint.directory import (
    CHECKSUM_FILE,
    LAYOUT_FILE,
    TOKENIZER_DIR,
    TRAIN_STATE_DIR,
    TRAINER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    resolve,
    verify_checksums,
    write_checksums,
)
from mtnlg.checkpoint.model import consolidated_weights, load_config, write_model_files
from mtnlg.checkpoint.output import MODEL, check_output
from mtnlg.model.counts import model_info
from mtnlg.util.fmt import human, human_bytes
from mtnlg.util.fs import atomic_dir, read_json


@dataclass
class CheckpointReport:
    """What ``mtnlg checkpoint inspect`` prints (``--json``: this, as a JSON object)."""

    path: str
    training: bool  # has train_state/ and trainer.json: a run resumes from it
    step: int | None
    consumed_samples: int | None
    consumed_tokens: int | None
    skipped_steps: int | None
    layout: dict[str, Any] | None  # None: not recorded (an inference checkpoint, or an older one)
    model: dict[str, int]
    parameters: int
    sizes: dict[str, int]  # bytes of each top-level entry
    checksums: str  # "ok (N files)", "not verified", "none (...)" or the first problem found

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _checksum_status(directory: Path, verify: bool) -> str:
    if not (directory / CHECKSUM_FILE).is_file():
        return f"none ({CHECKSUM_FILE} absent: an inference checkpoint, or an incomplete one)"
    if not verify:
        return "not verified"
    try:
        verify_checksums(directory)
    except CheckpointError as exc:
        return f"FAILED: {exc}"
    return f"ok ({len(read_json(directory / CHECKSUM_FILE, CheckpointError))} files)"


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json(path, CheckpointError) if path.is_file() else None


def inspect_checkpoint(path: str | Path, verify: bool = True) -> CheckpointReport:
    """Read ``path`` (a checkpoint, or a run directory's latest one) without loading any tensor;
    ``verify`` re-hashes every file against ``checksums.json`` (reads the whole checkpoint once)."""
    directory = resolve(path)
    cfg = load_config(directory)
    state = (_read_json(directory / TRAINER_FILE) or {}).get("state", {})
    m = cfg.model
    shape = {"n_layers": m.n_layers, "hidden": m.hidden, "n_heads": m.n_heads, "ffn_hidden": m.ffn_size,
             "seq_len": m.seq_len, "vocab_size": m.vocab_size, "padded_vocab_size": m.padded_vocab_size}
    return CheckpointReport(
        path=str(directory), training=(directory / TRAIN_STATE_DIR).is_dir() and bool(state),
        step=state.get("step"), consumed_samples=state.get("consumed_samples"),
        consumed_tokens=state.get("consumed_tokens"), skipped_steps=state.get("skipped_steps"),
        layout=_read_json(directory / LAYOUT_FILE), model=shape, parameters=model_info(m).parameters,
        sizes={p.name + ("/" if p.is_dir() else ""): _size(p) for p in sorted(directory.iterdir())},
        checksums=_checksum_status(directory, verify),
    )  # fmt: skip


def _layout_text(layout: dict[str, Any] | None) -> str:
    if layout is None:
        return f"not recorded (no {LAYOUT_FILE})"
    text = f"world size {layout['world_size']}: dp={layout['dp']} pp={layout['pp']} tp={layout['tp']}"
    if layout["pp"] > 1:
        text += f", {layout['pp_schedule']} with {layout['pp_stages_per_rank']} stage(s) per rank"
    extra = {k: v for k, v in layout.items() if k not in {"world_size", "dp", "pp", "tp", "pp_schedule",
                                                         "pp_stages_per_rank", "pp_microbatches"}}
    return text + "".join(f", {k}={v}" for k, v in extra.items() if v)  # e.g. sequence_parallel=True


def format_report(r: CheckpointReport) -> str:
    """The report as aligned lines for a terminal."""
    m = r.model
    progress = (f"step {r.step}: {r.consumed_tokens:,} tokens ({r.consumed_samples:,} samples), "
                f"{r.skipped_steps} skipped steps" if r.step is not None else "none (an inference checkpoint)")
    lines = [
        ("checkpoint", r.path),
        ("progress", progress),
        ("saved under", _layout_text(r.layout)),
        ("model", f"L={m['n_layers']} hidden={m['hidden']} heads={m['n_heads']} ffn={m['ffn_hidden']} "
                  f"seq={m['seq_len']} vocab={m['vocab_size']} (padded to {m['padded_vocab_size']})"),
        ("parameters", f"{human(r.parameters)} ({r.parameters:,})"),
        ("size", f"{human_bytes(sum(r.sizes.values()))}: " + ", ".join(
            f"{name} {human_bytes(size)}" for name, size in sorted(r.sizes.items(), key=lambda kv: -kv[1]))),
        ("checksums", r.checksums),
    ]  # fmt: skip
    return "\n".join(f"{name:12s} {value}" for name, value in lines)


def export_checkpoint(path: str | Path, out: str | Path, verify: bool = True, overwrite: bool = False) -> Path:
    """Write ``out``: config.json, a consolidated model.safetensors and the tokenizer of ``path``.

    The weights come from ``train_state/`` when there is one (in this process alone, whatever
    layout wrote it), else from ``model.safetensors``. ``out`` must be new or empty, or with
    ``overwrite`` an exported model (``check_output``); never the run or step it reads. ``verify``
    first checks the checksums (a training checkpoint has them).
    """
    directory = resolve(path)
    out = check_output(out, MODEL, [path, directory], overwrite)
    if verify and (directory / CHECKSUM_FILE).is_file():
        verify_checksums(directory)
    cfg = load_config(directory)
    if (directory / TRAIN_STATE_DIR).is_dir():
        weights = consolidated_weights(directory / TRAIN_STATE_DIR, cfg)
    elif (directory / WEIGHTS_FILE).is_file():
        weights = load_file(str(directory / WEIGHTS_FILE))
    else:
        raise CheckpointError(f"{directory} has neither {TRAIN_STATE_DIR}/ nor {WEIGHTS_FILE}: no weights to export")

    def fill(tmp: Path) -> None:
        write_model_files(tmp, weights, cfg, tokenizer=None)
        if (directory / TOKENIZER_DIR).is_dir():
            shutil.copytree(directory / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        write_checksums(tmp, local=True)

    return atomic_dir(out, fill)
