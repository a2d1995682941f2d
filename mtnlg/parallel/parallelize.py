"""``parallelize(model, dims, cfg)``: turn the plain single-device GPT into this rank's part of it.

Transformations apply in a fixed order, each taking the previous one's module:

1. tensor (+ sequence) parallelism: shard every layer over the ``tp`` mesh (``tensor.py``);
2. pipeline parallelism: keep only this rank's stages (not implemented yet: ``parallel.pp`` must be 1);
3. activation checkpointing: the model's own ``model.activation_checkpointing`` flag;
4. compile;
5. data parallelism, outermost, so it wraps the already-sharded parameters (not implemented yet:
   ``parallel.dp`` must be 1).

The single-process model is the reference every layout is tested against.
"""

from __future__ import annotations

import contextlib

from torch.distributed.tensor.parallel import loss_parallel

from mtnlg.checkpoint import load_model
from mtnlg.config import Config, ConfigError, ParallelConfig
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT
from mtnlg.parallel.dims import ParallelDims, init_distributed
from mtnlg.parallel.tensor import apply_tensor_parallel


def parallelize(model: GPT, dims: ParallelDims, cfg: Config, *, inference: bool = False) -> GPT:
    """Apply the parallel layout of ``dims`` to ``model`` in place and return it.

    ``inference=True`` is for generation: no sequence parallelism (a decode step has one
    token) and the logits are gathered, since sampling needs the whole vocabulary.
    Every rank must hold the same weights beforehand (same seed, or the same checkpoint).
    """
    if dims.pp > 1:
        raise ConfigError(
            f"parallel.pp={dims.pp}: pipeline parallelism is not implemented yet; use parallel.pp=1"
        )
    if dims.dp > 1:  # without it, replicas would silently train apart
        raise ConfigError(
            f"parallel.dp={dims.dp}: data parallelism is not implemented yet; make every process a "
            f"tensor-parallel rank (--parallel.tp={dims.world_size})"
        )
    if dims.tp_enabled:
        apply_tensor_parallel(
            model,
            dims.tp_mesh,
            sequence_parallel=cfg.parallel.sequence_parallel and not inference,
            loss_parallel=not inference,
        )
    return model


def loss_context(dims: ParallelDims) -> contextlib.AbstractContextManager:
    """Wrap forward and backward of a training step in this: under tp the loss is vocab-parallel.

    The tensor-parallel output layer leaves the logits split by vocabulary; ``loss_parallel``
    lets ``F.cross_entropy`` (in the model) and its backward work on the shards.
    """
    return loss_parallel() if dims.tp_enabled else contextlib.nullcontext()


def load_parallel_for_inference(
    path: str, parallel: ParallelConfig
) -> tuple[GPT, Config, Tokenizer | None, ParallelDims]:
    """Every rank loads the plain checkpoint, then keeps its tensor-parallel part for generation.

    The plain model (not the fp32/int8 inference layouts of ``mtnlg.quantize``) is loaded, since
    only ``nn.Linear`` layers can be sharded by the plan.
    """
    model, cfg, tokenizer = load_model(path)
    dims = init_distributed(parallel)
    return parallelize(model, dims, cfg, inference=True), cfg, tokenizer, dims
