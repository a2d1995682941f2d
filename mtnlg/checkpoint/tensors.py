"""Tensors read and written one at a time: what lets conversion stream instead of holding the model.

``TensorSource`` reads named tensors lazily from safetensors files (``safe_open``: only the asked tensor
is read), a sharded directory's ``model.safetensors.index.json``, a pickled ``pytorch_model.bin``
(memory-mapped) or an in-memory dict. ``write_streaming`` writes a safetensors file whose header is
known in advance (names, shapes, dtypes), then each tensor's bytes as it is produced.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mtnlg.checkpoint.directory import CheckpointError
from mtnlg.util.fs import read_json

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class TensorSource:
    """Named tensors, each read when asked for. ``label`` names the file(s) in errors."""

    def __init__(self, label: str, where: dict[str, Any], shapes: dict[str, tuple[torch.Size, torch.dtype]],
                 prefix: str = "") -> None:
        self.label, self._where, self._shapes, self.prefix = label, where, shapes, prefix

    @classmethod
    def of_files(cls, files: list[Path], label: str | None = None, prefix: str = "") -> TensorSource:
        where: dict[str, Any] = {}
        shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for a damaged header
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            for name in handle.keys():
                part = handle.get_slice(name)
                shapes[name] = (torch.Size(part.get_shape()), _dtype(part.get_dtype(), path))
                where[name] = handle
        return cls(label or str(files[0]), where, shapes, prefix)

    @classmethod
    def of_dict(cls, state: dict[str, torch.Tensor], label: str, prefix: str = "") -> TensorSource:
        return cls(label, dict(state), {k: (v.shape, v.dtype) for k, v in state.items()}, prefix)

    def names(self) -> set[str]:
        return set(self._shapes)

    def _key(self, name: str) -> str:
        return name if name in self._shapes or not self.prefix else name.removeprefix(self.prefix)

    def shape(self, name: str) -> torch.Size:
        return self._shapes[self._key(name)][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._shapes[self._key(name)][1]

    def get(self, name: str) -> torch.Tensor:
        key = self._key(name)
        held = self._where[key]
        return held if isinstance(held, torch.Tensor) else held.get_tensor(key)


def _dtype(name: str, path: Path) -> torch.dtype:
    for dtype, code in _DTYPES.items():
        if code == name:
            return dtype
    raise CheckpointError(f"{path}: tensors of dtype {name} are not supported")


def hf_source(hf_dir: Path, prefix: str = "") -> TensorSource:
    """The weights of an HF directory: ``model.safetensors``, a sharded index, or ``pytorch_model.bin``."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (hf_dir / f).is_file()]
        if absent:
            raise CheckpointError(f"{index}: names shard files that are missing: {absent[:4]}")
        source = TensorSource.of_files([hf_dir / f for f in files], str(index), prefix)
        stray = sorted(set(weight_map) ^ source.names())
        if stray:
            raise CheckpointError(f"{index}: weight_map and the shards disagree on {len(stray)} tensors: {stray[:4]}")
        return source
    if (hf_dir / "model.safetensors").is_file():
        return TensorSource.of_files([hf_dir / "model.safetensors"], prefix=prefix)
    if (hf_dir / "pytorch_model.bin").is_file():
        state = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        return TensorSource.of_dict(state, str(hf_dir / "pytorch_model.bin"), prefix)
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors, {INDEX_FILE} or pytorch_model.bin")


def write_streaming(path: Path, shapes: dict[str, tuple[torch.Size, torch.dtype]],
                    produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of the tensors ``shapes`` declares, calling ``produce(name)`` for one at a time.

    The layout is safetensors' own: an 8-byte little-endian header length, the JSON header (offsets of
    each tensor's bytes, padded with spaces to 8 bytes), then the bytes in header order.
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        size = shape.numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, (shape, dtype) in shapes.items():
            tensor = produce(name).to(dtype).contiguous()
            if tensor.shape != shape:
                raise ValueError(f"{path}: {name} came out {list(tensor.shape)}, expected {list(shape)}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
