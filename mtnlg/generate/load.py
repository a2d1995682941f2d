"""The one way a checkpoint becomes a model ready to generate: every inference path (``mtnlg generate``,
``chat``, ``serve``, ``evaluate``, the lm-eval adaptor) loads through here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtnlg.checkpoint.directory import resolve_verified
from mtnlg.checkpoint.model import load_config, load_model, load_tokenizer
from mtnlg.checkpoint.shards import load_local_shards
from mtnlg.config import Config, ParallelConfig
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.quantize import FORMATS, check_quantization, load_quantized, prepare_for_inference, stored_format
from mtnlg.model.gpt import GPT
from mtnlg.parallel.dims import ParallelDims, init_distributed
from mtnlg.parallel.parallelize import parallelize


def load_for_inference(
    path: str | Path, quantize: str | None = None, device: str = "cpu", max_batch_size: int = 8
) -> tuple[GPT, Config, Tokenizer | None]:
    """A checkpoint ready to generate (``prepare_for_inference``): in its format if it was saved
    quantized (int8, int4), quantized with ``quantize='int8'``/``'int4'``, else fp32 in the fast layout."""
    check_quantization(quantize)
    directory = resolve_verified(path)
    stored = stored_format(directory)
    if stored is not None or quantize in FORMATS:
        (stored or FORMATS[str(quantize)]).check_device(device)
    if stored is not None:
        return load_quantized(directory)
    model, cfg, tokenizer = load_model(directory, device=device)
    return prepare_for_inference(model, quantize, max_batch_size), cfg, tokenizer


def load_parallel_for_inference(
    path: str | Path, parallel: ParallelConfig
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
    parallelize(model, dims, cfg, inference=True, fill=lambda m: load_local_shards(m, directory, dims.device))
    return model.eval(), cfg, load_tokenizer(directory), dims
