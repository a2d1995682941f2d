"""Inference weight formats for the Linear layers (attention, MLP and the output layer).

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth.
Two formats, both chosen by measurement (torch 2.13, x86 CPU, 1 thread, gpt2-small shapes,
milliseconds per call at batch 1 / batch 8):

    layer (in x out)     nn.Linear      (in, out) fp32   fbgemm int8    onednn int8    _weight_int8pack_mm
    768 x 3072           0.33 / 1.01    0.32 / 0.49      0.11 / 0.13    0.22 / 0.26    ~1.1 / ~22
    3072 x 768           0.33 / 1.08    0.31 / 0.37      0.12 / 0.10    0.23 / 0.32    ~0.9 / ~10
    768 x 50304 (head)   9.5 / 41       ~12 / 26         1.5 / 2.2      1.8 / 2.5      ~58 / ~186

fp32 (``FP32Linear``): the same weights laid out once for the GEMM kernel. At batch 1 every
layout streams the weights at about the memory bandwidth; at batch 2-32 the layout decides.
All 49 gpt2-small Linears in a row (2 threads, milliseconds at batch 1 / batch 8, noisy VM):
nn.Linear's (out, in) 21 / 58-73, (in, out) contiguous with ``addmm`` (Hugging Face's Conv1D
layout) 20 / 36-47, oneDNN's prepacked blocked layout 22-24 / 31-39. End to end, greedy
decoding at batch 8 went from 166 to 186 tokens/s (2 threads) and from 78 to 106 (1 thread)
with oneDNN, while batch 1 lost about 7 % (34.6 vs 37.4 tokens/s, alternating runs: oneDNN
adds ~25 us per call). So engines that decode batches use oneDNN where the build has it, and
engines for one sequence at a time (``max_batch_size=1``) use (in, out) + ``addmm``.

int8 (``Int8Linear``): fbgemm's dynamic int8 linear (``quantized::linear_dynamic``): weights
int8 with one scale per output row (symmetric), each call quantizes its activations per
tensor to 7-bit unsigned (``reduce_range``, which keeps fbgemm's 16-bit pairwise sums from
saturating) and accumulates in int32; about 1.5-2% relative error per layer and 4x fewer bytes.
onednn's kernel is more accurate (full 8-bit activations, ~1%) but the activation quantization
it needs from Python costs more than it saves at these sizes; weight-only
``_weight_int8pack_mm`` dequantizes inside and is far slower. torchao 0.18's CPU paths
(measured on torch 2.13, all 49 gpt2-small layers, 2 threads, ms at batch 1 / 8; fbgemm here
9.8-11 / 13-16): int8 dynamic activation + int8 weight 103 / 129 eager, 17 / 28 under
``torch.compile`` (60 s to compile); int8 weight-only 82 / 103 eager, 68 / 110 compiled; int4
weight-only needs a kernel package (mslk) that is not installed. So fbgemm stays, and torchao is
not a dependency.

Caveat: fbgemm's packed weights are built from a per-channel quantized tensor, and PyTorch has
deprecated quantized tensors (pytorch/pytorch#184982); they still work in 2.13. Both formats
are CPU formats: on a GPU, run the plain model (bf16).

A quantized checkpoint is an ordinary checkpoint directory whose weights file is
``model-int8.safetensors``: each quantized layer stores ``weight_int8`` (int8, out x in),
``weight_scale`` (fp32, out) and ``bias``; embeddings and LayerNorms stay fp32.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mtnlg.checkpoint.directory import (
    CONFIG_FILE,
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
from mtnlg.checkpoint.output import INT8, check_output
from mtnlg.config import Config
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT
from mtnlg.model.moe import GroupedExperts
from mtnlg.util.fs import atomic_dir

ROUTER = "router.gate"  # a MoE router's Linear: kept fp32
QUANTIZATIONS = ("int8",)


def check_backend(device: torch.device | str) -> None:
    if torch.device(device).type != "cpu":
        raise ValueError(f"int8 inference runs on CPU (fbgemm kernels); got device {device!r}: use bf16 on GPUs")
    if torch.backends.quantized.engine == "none":
        raise ValueError(
            "this PyTorch build has no quantized CPU engine "
            f"(supported: {torch.backends.quantized.supported_engines}); int8 inference is unavailable"
        )


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: W ~= W_q * scale[:, None], W_q in [-127, 127]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
    return torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows and fp32 row scales; activations quantized per call.

    ``weight_int8``, ``weight_scale`` and ``bias`` are buffers (saved in the state dict); the
    kernel's packed form is rebuilt from them on first use and after every state-dict load.
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.ndim != 2:
            shape = tuple(weight_int8.shape)
            raise ValueError(f"weight_int8 must be a 2-D int8 tensor, got {weight_int8.dtype} {shape}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self._packed: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias)

    def _pack(self) -> torch.Tensor:
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated; the kernels are not yet replaced
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor, torch.quantize_per_channel.*")
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight_int8.cpu(), self.weight_scale.double().cpu(), zero_points, 0
            )
            return torch.ops.quantized.linear_prepack(qweight, self.bias)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = self._pack()
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed, True)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Experts(nn.Module):
    """A MoE layer's experts in int8: expert e's Linears as ``Int8Linear``s (``fc_in.e``, ``fc_out.e``, and
    ``fc_gate.e`` for SwiGLU experts), run on the rows routed to it; a drop-in for ``GroupedExperts``."""

    def __init__(self, fc_in: list[Int8Linear], fc_out: list[Int8Linear], approximate: str,
                 fc_gate: list[Int8Linear] | None = None) -> None:
        super().__init__()
        self.fc_in, self.fc_out = nn.ModuleList(fc_in), nn.ModuleList(fc_out)
        self.fc_gate = nn.ModuleList(fc_gate) if fc_gate else None
        self.approximate = approximate

    @classmethod
    def from_grouped(cls, experts: GroupedExperts) -> Int8Experts:
        def layers(part: str) -> list[Int8Linear]:
            weight, bias = getattr(experts, f"{part}_weight"), getattr(experts, f"{part}_bias")
            biases = bias if bias is not None else [None] * len(weight)
            return [Int8Linear(*quantize_weight(w), b) for w, b in zip(weight, biases, strict=True)]

        gate = layers("fc_gate") if experts.fc_gate_weight is not None else None
        return cls(layers("fc_in"), layers("fc_out"), experts.approximate, gate)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is not None:
            return self.fc_out[e](torch.nn.functional.silu(self.fc_gate[e](x)) * self.fc_in[e](x))
        return self.fc_out[e](torch.nn.functional.gelu(self.fc_in[e](x), approximate=self.approximate))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        chunks = x.split(counts.tolist())
        return torch.cat([self._expert(e, chunk) if len(chunk) else chunk for e, chunk in enumerate(chunks)])


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this build runs oneDNN's prepacked fp32 Linear (x86 and Arm builds usually do)."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2))
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), packed, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return True


class FP32Linear(nn.Module):
    """y = x W^T + b with W laid out once, at load time, for the CPU's GEMM kernels (see above).

    An fp32 W is reordered into oneDNN's blocked layout where the build has oneDNN
    (``torch.ops.mkldnn._reorder_linear_weight``, the form Inductor's CPU backend gives frozen
    Linear weights); otherwise it is stored (in, out) contiguous for ``addmm``. Either way the
    layer holds its own copy (the tied output layer too: the embedding keeps the original for
    lookups). An inference format, not a save format: the buffers are not in the state dict,
    and a oneDNN weight cannot be deep-copied.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        fp32 = weight.dtype == torch.float32
        self.onednn = fp32 and onednn_linear_available() if onednn is None else onednn
        weight = weight.detach().contiguous()
        laid_out = torch.ops.mkldnn._reorder_linear_weight(weight) if self.onednn else weight.t().contiguous()
        self.register_buffer("weight", laid_out, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, onednn: bool | None = None) -> FP32Linear:
        return cls(linear.weight, linear.bias, onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.onednn:
            parts = x2.split(ONEDNN_MAX_ROWS)
            y = self._onednn(x2) if len(parts) == 1 else torch.cat([self._onednn(p) for p in parts])
            return y.view(*x.shape[:-1], self.out_features)
        y = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return y.view(*x.shape[:-1], self.out_features)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN on ``x`` (at most ONEDNN_MAX_ROWS rows) padded to its ``row_bucket``."""
        rows = x.shape[0]
        padded = row_bucket(rows)
        if padded != rows:
            x = torch.nn.functional.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")[:rows]

    def extra_repr(self) -> str:
        layout = "onednn" if self.onednn else "(in, out)"
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={layout}"


ONEDNN_MAX_ROWS = 128  # rows per oneDNN call: a longer prefill is computed in pieces of this many


def row_bucket(rows: int) -> int:
    """The row count a oneDNN call of ``rows`` rows is padded to: exact up to 16, then the next of
    8 steps per power of two (at most 12.5 % more rows).

    oneDNN (with ideep's cache in front of it) compiles and keeps a kernel per input shape, ~0.5 MB
    each, up to 1024 of them: prompts of every length times every batch size filled that, and a
    server's memory grew by ~0.5 MB per request of a new shape. Pieces of at most 128 rows padded to
    these sizes make 40 shapes per weight, so memory stops growing after a short warm-up; the padding
    costs < 12.5 % of a prefill, the pieces (the weights read once per 128 rows) ~5 %.
    """
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)  # an eighth of the power of two below ``rows``
    return -(-rows // step) * step


def _replace_linears(model: GPT, convert: Callable[[nn.Linear], nn.Module]) -> GPT:
    """Every nn.Linear but a MoE router's (it routes in fp32 and is small) converted, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith(ROUTER):
            model.set_submodule(name, convert(module))
    return model.eval()


def prepare_for_inference(model: GPT, quantize: str | None = None, max_batch_size: int = 8) -> GPT:
    """Convert a plain CPU model's Linear layers, in place, to the fastest inference format:
    ``FP32Linear`` by default, ``Int8Linear`` with ``quantize='int8'``. A model on another
    device is returned as is (int8 there is an error).

    ``max_batch_size`` is the most sequences decoded together: the fp32 layout is chosen for it
    (oneDNN's for batches, (in, out) + ``addmm`` for one sequence at a time, ~7 % faster there)."""
    if quantize not in (None, "none", *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantize!r}; choose one of: none, {', '.join(QUANTIZATIONS)}")
    if quantize == "int8":
        return quantize_model(model)
    if next(model.parameters()).device.type != "cpu":
        return model
    onednn = None if max_batch_size > 1 else False
    return _replace_linears(model, lambda linear: FP32Linear.from_linear(linear, onednn))


def quantize_model(model: GPT) -> GPT:
    """Replace every nn.Linear (including the tied output layer, which gets its own int8 copy;
    the embedding and MoE routers stay fp32) by an Int8Linear, and MoE experts by Int8Experts, in
    place; returns the model in eval mode."""
    check_backend(next(model.parameters()).device)
    for name, module in list(model.named_modules()):
        if isinstance(module, GroupedExperts):
            model.set_submodule(name, Int8Experts.from_grouped(module))
    return _replace_linears(model, Int8Linear.from_linear)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def save_quantized(directory: str | Path, model: GPT, cfg: Config, tokenizer: Tokenizer | None = None) -> Path:
    """Write an int8 checkpoint directory atomically (config, int8 weights, tokenizer)."""
    if not is_quantized(model):
        raise ValueError("save_quantized needs a model returned by quantize_model")
    weights = model_state_for_saving(model)

    def fill(tmp: Path) -> None:
        write_model_files(tmp, None, cfg, tokenizer)
        save_file(weights, str(tmp / INT8_WEIGHTS_FILE), metadata={"format": "pt", "quantization": "int8"})
        write_checksums(tmp, local=True)

    return atomic_dir(directory, fill)


def _stored_int8_linear(state: dict[str, torch.Tensor], name: str) -> Int8Linear:
    return Int8Linear(state[f"{name}.weight_int8"], state[f"{name}.weight_scale"], state.get(f"{name}.bias"))


def load_quantized(path: str | Path) -> tuple[GPT, Config, Tokenizer | None]:
    """Model, config and tokenizer of an int8 checkpoint written by ``save_quantized`` (verified)."""
    directory = resolve_verified(path)
    weights = directory / INT8_WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {INT8_WEIGHTS_FILE}; quantize it with `mtnlg quantize`")
    check_backend("cpu")
    cfg = load_config(directory)
    state = read_safetensors(weights)
    with torch.device("meta"):
        model = GPT(cfg.model)
    try:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and not name.endswith(ROUTER):
                model.set_submodule(name, _stored_int8_linear(state, name))
            if isinstance(module, GroupedExperts):
                E = cfg.model.moe_experts
                parts = ("fc_in", "fc_out", "fc_gate") if module.fc_gate_weight is not None else ("fc_in", "fc_out")
                stored = [[_stored_int8_linear(state, f"{name}.{part}.{e}") for e in range(E)] for part in parts]
                model.set_submodule(name, Int8Experts(stored[0], stored[1], module.approximate, *stored[2:]))
    except KeyError as exc:
        raise CheckpointError(f"{weights}: missing {exc.args[0]} (does it fit config.json?)") from None
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not fit {directory / CONFIG_FILE}: {exc}") from None
    return model.eval(), cfg, load_tokenizer(directory)


def quantize_checkpoint(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Load a fp32 checkpoint, quantize it to int8 and save it to ``out`` (``check_output``'s rules)."""
    check_output(out, INT8, [src], overwrite)
    model, cfg, tokenizer = load_model(src)
    return save_quantized(out, quantize_model(model), cfg, tokenizer)
