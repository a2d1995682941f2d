"""Each rank reads only its own shards of a checkpoint: a tensor-parallel model loaded without ever
holding the whole model on any rank.

The model is built on the meta device and sharded first (``mtnlg.parallel.parallelize``), so
every parameter is a DTensor whose placements say which part of the whole tensor this rank
holds; ``load_local_shards`` then allocates only those parts and fills each from the checkpoint:

- ``model.safetensors``: each shard is read with ``safe_open(...).get_slice(name)[rows, cols]``,
  the file opened afresh for every tensor. safetensors reads through a memory map, and the pages
  a slice touches count in the process's resident set while the map is open: a column slice of a
  row-major matrix touches most of its pages, so one map held open for the whole load would end
  with the whole file resident. Reopened per tensor, at most one whole tensor is mapped at a time.
- ``train_state/`` (a training step saved without consolidated weights): DCP loads a DTensor
  state dict collectively, each rank reading the byte ranges of its own shards.

Measured per-rank peak RSS is stated in docs/serving.md (multi-device serving) and bounded by
``tests/generate/test_sharded_load.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mtnlg.checkpoint.directory import TRAIN_STATE_DIR, WEIGHTS_FILE, CheckpointError
from mtnlg.model.gpt import GPT


def local_region(param: torch.Tensor) -> tuple[slice, ...]:
    """The slices of the whole tensor that this rank's part of ``param`` covers (all of it when
    ``param`` is not a DTensor, or is replicated)."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


@torch.no_grad()
def load_local_shards(model: GPT, directory: Path, device: torch.device) -> None:
    """Allocate the (meta, sharded) ``model``'s parameters on ``device`` and fill each with its part
    of the checkpoint in ``directory`` (collective when the weights come from ``train_state/``)."""
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gave each holder of the shared weight its own tensor
    for buffer in model.buffers():  # only non-persistent counters (MoE statistics), which start at zero
        buffer.zero_()
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        _read_slices(model, weights)
    elif (directory / TRAIN_STATE_DIR).is_dir():
        dcp.load({"model": model.state_dict()}, checkpoint_id=directory / TRAIN_STATE_DIR)
    else:
        raise CheckpointError(f"{directory}: missing {WEIGHTS_FILE} (an int8 checkpoint cannot be sharded: "
                              "serve it in one process, or shard its fp32 checkpoint)")


def _read_slices(model: GPT, weights: Path) -> None:
    with safe_open(str(weights), framework="pt") as handle:
        stored = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    params = dict(model.named_parameters())  # a tied output weight once, under wte's name
    tied = model.cfg.tie_embeddings and "lm_head.weight" not in stored
    wanted = {("wte.weight" if tied and n == "lm_head.weight" else n) for n in model.state_dict()}
    missing, unexpected = sorted(wanted - set(stored)), sorted(set(stored) - wanted)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, param in params.items():
        if list(param.shape) != stored[name]:
            raise CheckpointError(f"{weights}: {name} is {stored[name]}, config.json makes it {list(param.shape)}")
        local = param.to_local() if isinstance(param, DTensor) else param
        with safe_open(str(weights), framework="pt") as handle:  # reopened: see the module docstring
            local.copy_(handle.get_slice(name)[local_region(param)])
