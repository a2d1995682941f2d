"""Converting a model to an inference format, and quantized checkpoints written and read.

``FORMATS`` is the one table of the quantized formats: each one's weights file, output kind (for
``check_output``), device check, and how a layer is made from an nn.Linear's weight or from what
a checkpoint stored. A quantized checkpoint is an ordinary checkpoint directory whose weights
file is that format's (``model-int8.safetensors``, ``model-int4.safetensors``); embeddings,
norms and MoE routers stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mtnlg.checkpoint.directory import (
    CONFIG_FILE,
    INT4_WEIGHTS_FILE,
    INT8_WEIGHTS_FILE,
    CheckpointError,
    resolve_verified,
    write_checksums,
)
from mtnlg.checkpoint.model import (
    load_config,
    load_model,
    load_tokenizer,
    model_state_for_saving,
    read_safetensors,
    write_model_files,
)
from mtnlg.checkpoint.output import INT4, INT8, check_output
from mtnlg.config import Config
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.quantize.experts import QuantizedExperts
from mtnlg.generate.quantize.fp32 import FP32Linear
from mtnlg.generate.quantize.int4 import DEFAULT_GROUP_SIZE, Int4Linear, check_int4_device, quantize_int4
from mtnlg.generate.quantize.int8 import Int8Linear, check_backend, quantize_weight
from mtnlg.model.gpt import GPT
from mtnlg.model.moe import GroupedExperts
from mtnlg.util.fs import atomic_dir

ROUTER = "router.gate"  # a MoE router's Linear: kept fp32
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Format:
    """A quantized weight format: where it is stored and how its layers are made."""

    name: str
    weights_file: str
    kind: str  # check_output's name of a directory holding it
    layer: type[nn.Module]
    check_device: Callable[[torch.device | str], None]
    make: Callable[[torch.Tensor, torch.Tensor | None, int], nn.Module]  # (weight, bias, group size)
    stored: Callable[[State, str], nn.Module]  # (checkpoint state, layer name)


def _stored_int8(state: State, name: str) -> nn.Module:
    return Int8Linear(state[f"{name}.weight_int8"], state[f"{name}.weight_scale"], state.get(f"{name}.bias"))


def _stored_int4(state: State, name: str) -> nn.Module:
    return Int4Linear(state[f"{name}.weight_int4"], state[f"{name}.weight_scale"], state[f"{name}.weight_offset"],
                      state.get(f"{name}.bias"))


FORMATS = {
    "int8": Format("int8", INT8_WEIGHTS_FILE, INT8, Int8Linear, check_backend,
                   lambda w, b, _: Int8Linear(*quantize_weight(w), b), _stored_int8),
    "int4": Format("int4", INT4_WEIGHTS_FILE, INT4, Int4Linear, check_int4_device,
                   lambda w, b, g: Int4Linear(*quantize_int4(w, g), b), _stored_int4),
}
QUANTIZATIONS = tuple(FORMATS)


def check_quantization(quantize: str | None) -> None:
    if quantize not in (None, "none", *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantize!r}; choose one of: none, {', '.join(QUANTIZATIONS)}")


def stored_format(directory: Path) -> Format | None:
    """The quantized format a checkpoint directory holds (None: a plain checkpoint)."""
    return next((f for f in FORMATS.values() if (directory / f.weights_file).is_file()), None)


def _replace_linears(model: GPT, convert: Callable[[nn.Linear], nn.Module]) -> GPT:
    """Every nn.Linear but a MoE router's (it routes in fp32 and is small) converted, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith(ROUTER):
            model.set_submodule(name, convert(module))
    return model.eval()


def prepare_for_inference(model: GPT, quantize: str | None = None, max_batch_size: int = 8,
                          group_size: int = DEFAULT_GROUP_SIZE) -> GPT:
    """Convert a plain CPU model's Linear layers, in place, to the fastest inference format:
    ``FP32Linear`` by default, ``Int8Linear`` / ``Int4Linear`` with ``quantize='int8'`` / ``'int4'``.
    A model on another device is returned as is (a quantized format there is an error).

    ``max_batch_size`` is the most sequences decoded together: the fp32 layout is chosen for it
    (oneDNN's for batches, (in, out) + ``addmm`` for one sequence at a time, ~7 % faster there)."""
    check_quantization(quantize)
    if quantize in FORMATS:
        return quantize_model(model, quantize, group_size)
    if next(model.parameters()).device.type != "cpu":
        return model
    onednn = None if max_batch_size > 1 else False
    return _replace_linears(model, lambda linear: FP32Linear.from_linear(linear, onednn))


def quantize_model(model: GPT, quantize: str = "int8", group_size: int = DEFAULT_GROUP_SIZE) -> GPT:
    """Replace every nn.Linear (including the tied output layer, which gets its own quantized copy;
    the embedding and MoE routers stay fp32) by the format's layer, and MoE experts by
    ``QuantizedExperts``, in place; returns the model in eval mode. ``group_size`` is int4's."""
    check_quantization(quantize)
    fmt = FORMATS[quantize]
    fmt.check_device(next(model.parameters()).device)
    for name, module in list(model.named_modules()):
        if isinstance(module, GroupedExperts):
            make = lambda w, b: fmt.make(w, b, group_size)  # noqa: E731
            model.set_submodule(name, QuantizedExperts.from_grouped(module, make))
    return _replace_linears(model, lambda linear: fmt.make(linear.weight, linear.bias, group_size))


def quantization_of(model: nn.Module) -> str | None:
    """The quantized format of a model's layers (None: not quantized)."""
    return next((f.name for f in FORMATS.values() if any(isinstance(m, f.layer) for m in model.modules())), None)


def is_quantized(model: nn.Module) -> bool:
    return quantization_of(model) is not None


def save_quantized(directory: str | Path, model: GPT, cfg: Config, tokenizer: Tokenizer | None = None) -> Path:
    """Write a quantized checkpoint directory atomically (config, quantized weights, tokenizer)."""
    quantize = quantization_of(model)
    if quantize is None:
        raise ValueError("save_quantized needs a model returned by quantize_model")
    weights, fmt = model_state_for_saving(model), FORMATS[quantize]

    def fill(tmp: Path) -> None:
        write_model_files(tmp, None, cfg, tokenizer)
        save_file(weights, str(tmp / fmt.weights_file), metadata={"format": "pt", "quantization": quantize})
        write_checksums(tmp, local=True)

    return atomic_dir(directory, fill)


def load_quantized(path: str | Path) -> tuple[GPT, Config, Tokenizer | None]:
    """Model, config and tokenizer of a quantized checkpoint written by ``save_quantized`` (verified)."""
    directory = resolve_verified(path)
    fmt = stored_format(directory)
    if fmt is None:
        names = " or ".join(f.weights_file for f in FORMATS.values())
        raise CheckpointError(f"{directory}: no {names}; quantize it with `mtnlg quantize`")
    fmt.check_device("cpu")
    weights = directory / fmt.weights_file
    cfg = load_config(directory)
    state = read_safetensors(weights)
    with torch.device("meta"):
        model = GPT(cfg.model)
    try:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and not name.endswith(ROUTER):
                model.set_submodule(name, fmt.stored(state, name))
            if isinstance(module, GroupedExperts):
                E = cfg.model.moe_experts
                parts = ("fc_in", "fc_out", "fc_gate") if module.fc_gate_weight is not None else ("fc_in", "fc_out")
                stored = [[fmt.stored(state, f"{name}.{part}.{e}") for e in range(E)] for part in parts]
                model.set_submodule(name, QuantizedExperts(stored[0], stored[1], module.approximate, *stored[2:]))
    except KeyError as exc:
        raise CheckpointError(f"{weights}: missing {exc.args[0]} (does it fit config.json?)") from None
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not fit {directory / CONFIG_FILE}: {exc}") from None
    return model.eval(), cfg, load_tokenizer(directory)


def quantize_checkpoint(src: str | Path, out: str | Path, overwrite: bool = False, quantize: str = "int8",
                        group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    """Load a fp32 checkpoint, quantize it (int8, or int4 in groups of ``group_size`` input columns)
    and save it to ``out`` (``check_output``'s rules)."""
    check_quantization(quantize)
    check_output(out, FORMATS[quantize].kind, [src], overwrite)
    model, cfg, tokenizer = load_model(src)
    return save_quantized(out, quantize_model(model, quantize, group_size), cfg, tokenizer)
