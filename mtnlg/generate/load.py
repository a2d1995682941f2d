"""The one way a checkpoint becomes a model ready to generate: every inference path (``mtnlg generate``,
``chat``, ``serve``, ``evaluate``, the lm-eval adaptor) loads through here.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mtnlg.checkpoint.directory import resolve_verified
from mtnlg.checkpoint.model import load_model
from mtnlg.config import Config, ParallelConfig
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.quantize import (
    INT8_WEIGHTS_FILE,
    QUANTIZATIONS,
    check_backend,
    load_quantized,
    prepare_for_inference,
)
from mtnlg.model.gpt import GPT
from mtnlg.model.rope import extend_context
from mtnlg.parallel.dims import ParallelDims, init_distributed
from mtnlg.parallel.parallelize import parallelize


def load_for_inference(
    path: str | Path, quantize: str | None = None, device: str = "cpu", max_batch_size: int = 8,
    context: dict | None = None,
) -> tuple[GPT, Config, Tokenizer | None]:
    """A checkpoint ready to generate (``prepare_for_inference``): int8 if it was saved quantized
    or ``quantize='int8'``, else fp32 in the fast layout. ``context``: model fields that run it at
    another context length (``mtnlg.model.rope.extend_context``: seq_len, rope_scaling, ...)."""
    if quantize not in (None, "none", *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantize!r}; choose one of: none, {', '.join(QUANTIZATIONS)}")
    directory = resolve_verified(path)
    if quantize == "int8" or (directory / INT8_WEIGHTS_FILE).is_file():
        check_backend(device)
    if (directory / INT8_WEIGHTS_FILE).is_file():
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
    path: str, parallel: ParallelConfig, context: dict | None = None
) -> tuple[GPT, Config, Tokenizer | None, ParallelDims]:
    """Every rank loads the plain checkpoint, then keeps its tensor-parallel part for generation.

    The plain model (not the fp32/int8 inference layouts of ``mtnlg.generate.quantize``) is loaded, since
    only ``nn.Linear`` layers can be sharded by the plan.
    """
    model, cfg, tokenizer = load_model(path)
    _extend_context(model, cfg, context)
    dims = init_distributed(parallel)
    return parallelize(model, dims, cfg, inference=True), cfg, tokenizer, dims
