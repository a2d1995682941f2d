"""The one way a checkpoint becomes a model ready to generate: every inference path (``mtnlg generate``,
``chat``, ``serve``, ``evaluate``, the lm-eval adaptor) loads through here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mtnlg.checkpoint.directory import resolve_verified
from mtnlg.checkpoint.model import load_config, load_model, load_tokenizer
from mtnlg.checkpoint.shards import load_local_shards
from mtnlg.config import Config, ParallelConfig
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.quantize import FORMATS, check_quantization, load_quantized, prepare_for_inference, stored_format
from mtnlg.model.gpt import GPT
from mtnlg.model.rope import extend_context
from mtnlg.parallel.dims import ParallelDims, init_distributed
from mtnlg.parallel.parallelize import parallelize


def load_for_inference(
    path: str | Path, quantize: str | None = None, device: str = "cpu", max_batch_size: int = 8,
    context: dict | None = None,
) -> tuple[GPT, Config, Tokenizer | None]:
    """A checkpoint ready to generate (``prepare_for_inference``): in its format if it was saved
    quantized (int8, int4), quantized with ``quantize='int8'``/``'int4'``, else fp32 in the fast layout.
    ``context``: model fields that run it at another context length (``mtnlg.model.rope.extend_context``:
    seq_len, rope_scaling, ...)."""
    check_quantization(quantize)
    directory = resolve_verified(path)
    stored = stored_format(directory)
    if stored is not None or quantize in FORMATS:
        (stored or FORMATS[str(quantize)]).check_device(device)
    if stored is not None:
        model, cfg, tokenizer = load_quantized(directory)
    else:
        model, cfg, tokenizer = load_model(directory, device=device)
        model = prepare_for_inference(model, quantize, max_batch_size)
    _extend_context(model, cfg, context)
    return model, cfg, tokenizer


def _extend_context(model: GPT, cfg: Config, context: dict | None) -> None:
    """The loader's context override, on the config every module of ``model`` reads; reported on stderr."""
    if context:
        assert model.cfg is cfg.model  # the modules read this object at every forward
        print(f"mtnlg: {extend_context(cfg.model, **context)}", file=sys.stderr)


def load_parallel_for_inference(
    path: str | Path, parallel: ParallelConfig, context: dict | None = None
) -> tuple[GPT, Config, Tokenizer | None, ParallelDims]:
    """This rank's tensor-parallel part of a checkpoint, ready to generate; collective.

    The model is built on the meta device and sharded before any weight exists, then each rank
    reads only its own slices of the checkpoint (``mtnlg.checkpoint.shards``): no rank ever holds
    the whole model. It stays in the plain layout (not the fp32/int8 inference layouts of
    ``mtnlg.generate.quantize``), since only ``nn.Linear`` layers can be sharded by the plan.
    """
    directory = resolve_verified(path)
    cfg = load_config(directory)
    dims = init_distributed(parallel)
    with torch.device("meta"):
        model = GPT(cfg.model)
    _extend_context(model, cfg, context)
    parallelize(model, dims, cfg, inference=True, fill=lambda m: load_local_shards(m, directory, dims.device))
    return model.eval(), cfg, load_tokenizer(directory), dims
