"""Typed configuration: one dataclass per concern, TOML files, ``--section.field=value`` overrides.

There is no global argument object: a ``Config`` is built once (preset -> file -> overrides),
validated, and passed explicitly. Every field carries its help text in ``metadata["help"]``
so ``--help`` and error messages can explain it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the field."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its help text (mutable defaults go through a factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


MOE_BALANCE = ("aux", "bias", "aux+bias", "none")


@dataclass
class ModelConfig:
    """Shape of the decoder-only Transformer (GPT-2 / MT-NLG architecture)."""

    vocab_size: int = _f(50257, "Tokenizer vocabulary size (ids 0..vocab_size-1).")
    seq_len: int = _f(1024, "Context length: the number of learned position embeddings.")
    n_layers: int = _f(12, "Number of Transformer blocks.")
    hidden: int = _f(768, "Model width (embedding and residual stream size).")
    n_heads: int = _f(12, "Attention heads per block; hidden must be divisible by it.")
    ffn_hidden: int = _f(0, "MLP inner width; 0 means 4 * hidden.")
    dropout: float = _f(0.0, "Dropout on embeddings, attention probabilities and residual branches.")
    layernorm_eps: float = _f(1e-5, "LayerNorm epsilon.")
    init_std: float = _f(0.02, "Std of the normal init; output projections use std / sqrt(2 * n_layers).")
    tie_embeddings: bool = _f(True, "Share the output layer's weight with the token embedding.")
    padded_vocab_multiple: int = _f(
        128, "Pad the embedding rows to a multiple of this (Megatron's make-vocab-size-divisible-by)."
    )
    activation: str = _f("gelu_tanh", "MLP activation: gelu_tanh (GPT-2) or gelu (exact erf).")
    activation_checkpointing: bool = _f(False, "Recompute each block's activations in backward to save memory.")
    moe_experts: int = _f(0, "Mixture of experts: expert MLPs per MoE block; 0 keeps every MLP dense.")
    moe_top_k: int = _f(2, "Experts each token is routed to (gates renormalised over them when > 1).")
    moe_every: int = _f(1, "Every k-th block is a MoE block (blocks k-1, 2k-1, ...); 2 = every other block.")
    moe_ffn_hidden: int = _f(0, "Inner width of each expert MLP; 0 means the dense MLP's (model.ffn_hidden).")
    moe_capacity_factor: float = _f(
        0.0, "Tokens an expert takes per batch, as a multiple of the even share (N k / E); 0 = dropless."
    )
    moe_score: str = _f("softmax", "Router scores: softmax (Switch, GShard) or sigmoid (DeepSeek-V3).")
    moe_balance: str = _f(
        "aux", "Load balancing: aux (auxiliary loss), bias (auxiliary-loss-free expert bias), aux+bias or none."
    )
    moe_aux_loss_coef: float = _f(0.01, "Weight of the Switch/GShard load-balancing loss (moe_balance aux).")
    moe_bias_update_rate: float = _f(
        1e-3, "Step of the expert-bias update, bias += rate * sign(mean load - load), before each optimizer step."
    )
    moe_z_loss_coef: float = _f(0.0, "Weight of the router z-loss, mean(logsumexp(logits)^2) (ST-MoE: 1e-3).")
    moe_shared_expert: bool = _f(False, "Add an always-on dense expert beside the routed ones (DeepSeek-MoE).")

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    @property
    def expert_ffn_size(self) -> int:
        return self.moe_ffn_hidden or self.ffn_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` has a mixture-of-experts MLP: every ``moe_every``-th block, the last of each run."""
        return self.moe_experts > 0 and (layer + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.padded_vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layers", "hidden", "n_heads", "padded_vocab_multiple"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.ffn_hidden < 0:
            raise ConfigError(f"model.ffn_hidden must be >= 0 (0 means 4*hidden), got {self.ffn_hidden}")
        if self.hidden % self.n_heads:
            raise ConfigError(
                f"model.hidden={self.hidden} is not divisible by model.n_heads={self.n_heads}: "
                "each head needs hidden/n_heads dimensions"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.layernorm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.layernorm_eps and model.init_std must be positive")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise ConfigError(f"model.activation must be 'gelu_tanh' or 'gelu', got {self.activation!r}")
        if self.moe_experts:
            self._validate_moe()

    def _validate_moe(self) -> None:
        if self.moe_experts < 0 or not 1 <= self.moe_top_k <= self.moe_experts:
            raise ConfigError(f"model.moe_top_k={self.moe_top_k} must be between 1 and model.moe_experts="
                              f"{self.moe_experts}")
        if self.moe_every < 1 or self.moe_every > self.n_layers:
            raise ConfigError(f"model.moe_every={self.moe_every} must be between 1 and model.n_layers={self.n_layers}")
        if self.moe_ffn_hidden < 0 or self.moe_capacity_factor < 0:
            raise ConfigError("model.moe_ffn_hidden and model.moe_capacity_factor must be >= 0 (0: default / dropless)")
        if self.moe_score not in ("softmax", "sigmoid"):
            raise ConfigError(f"model.moe_score must be softmax or sigmoid, got {self.moe_score!r}")
        if self.moe_balance not in MOE_BALANCE:
            raise ConfigError(f"model.moe_balance must be one of {', '.join(MOE_BALANCE)}, got {self.moe_balance!r}")
        if min(self.moe_aux_loss_coef, self.moe_z_loss_coef, self.moe_bias_update_rate) < 0:
            raise ConfigError("model.moe_aux_loss_coef, moe_z_loss_coef and moe_bias_update_rate must be >= 0")


PP_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "zbv", "dualpipev")


@dataclass
class ParallelConfig:
    """How the world of processes is split: dp x pp x tp = world size."""

    tp: int = _f(1, "Tensor-parallel size: each layer's weights are split across this many ranks.")
    pp: int = _f(1, "Pipeline-parallel size: the layers are split into this many stages.")
    ep: int = _f(1, "Expert-parallel size: MoE experts split over this many of the data-parallel ranks.")
    dp: int = _f(-1, "Data-parallel size; -1 means world_size / (tp * pp).")
    dp_replicate: int = _f(
        1, "HSDP: model replicas among the dp ranks, each sharded over dp / dp_replicate ranks (1: fully sharded)."
    )
    dp_shard: int = _f(
        -1, "Ranks each replica's parameters are sharded over; -1 means dp / dp_replicate (1: DDP-like)."
    )
    reshard_after_forward: bool = _f(
        True, "FSDP frees each block's gathered weights after forward (less memory, one more all-gather in backward)."
    )
    sequence_parallel: bool = _f(False, "Shard LayerNorm/dropout activations along the sequence under tp.")
    pp_schedule: str = _f(
        "1f1b", "Pipeline schedule: 1f1b, gpipe, interleaved_1f1b (pp_stages_per_rank >= 2), zbv or dualpipev "
        "(zero-bubble V schedules, pp_stages_per_rank = 2)."
    )
    pp_stages_per_rank: int = _f(1, "Pipeline stages (virtual stages) each pipeline rank runs.")
    pp_microbatches: int = _f(
        0, "Micro-batches per pipeline step; 0 means the accumulation steps (global batch / micro batch / dp)."
    )
    timeout_s: float = _f(
        600.0, "Seconds a collective may wait for the other ranks before the job fails (a dead or hung rank)."
    )

    def validate(self) -> None:
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard must be >= 1 or -1 (derive), got {self.dp_shard}")
        for name in ("tp", "pp", "ep", "pp_stages_per_rank", "dp_replicate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.pp_microbatches < 0:
            raise ConfigError(f"parallel.pp_microbatches must be >= 0 (0: the accumulation steps), got "
                              f"{self.pp_microbatches}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule!r} is unknown; choose one of "
                              f"{', '.join(PP_SCHEDULES)}")
        if self.dp == 0 or self.dp < -1:
            raise ConfigError(f"parallel.dp must be >= 1 or -1 (derive), got {self.dp}")
        if not self.timeout_s > 0:
            raise ConfigError(f"parallel.timeout_s must be positive, got {self.timeout_s}")


@dataclass
class DataConfig:
    """Where training tokens come from and how they are split."""

    data_path: list[str] = _f(
        [], "Indexed dataset prefixes, optionally weighted: ['a'] or ['0.3', 'a', '0.7', 'b']."
    )
    tokenizer: str = _f("", "Tokenizer directory (tokenizer.json) used to build the data.")
    split: str = _f("949,50,1", "Train/valid/test proportions by document, Megatron style.")
    seed: int = _f(1234, "Seed of the sample shuffle.")
    cache_dir: str = _f("", "Where sample-index caches go; empty means beside the data.")

    def validate(self) -> None:
        parts = self.split.split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"data.split must be comma-separated numbers, got {self.split!r}") from None
        if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"data.split needs 1-3 non-negative numbers with a positive sum, got {self.split!r}")


@dataclass
class TrainConfig:
    """The optimisation recipe (MT-NLG defaults) and the run's bookkeeping."""

    micro_batch_size: int = _f(8, "Sequences per forward/backward on one data-parallel rank.")
    global_batch_size: int = _f(8, "Sequences per optimizer step across all data-parallel ranks.")
    steps: int = _f(1000, "Optimizer steps to train.")
    lr: float = _f(6e-4, "Peak learning rate.")
    min_lr_ratio: float = _f(0.1, "Cosine decay ends at lr * min_lr_ratio.")
    warmup_steps: int = _f(100, "Linear warmup steps.")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to biases and LayerNorm).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    rampup_batch_size: list[int] = _f(
        [], "Batch-size ramp-up [start, increment, ramp_samples], Megatron style; empty disables."
    )
    precision: str = _f("fp32", "fp32, bf16 (autocast) or fp16 (autocast + dynamic loss scaling).")
    seed: int = _f(1234, "Seed of model init and dropout.")
    eval_interval: int = _f(100, "Steps between validation passes; 0 disables.")
    eval_iters: int = _f(
        10, "Validation micro-batches of micro_batch_size samples per pass, shared by the data-parallel ranks."
    )
    log_interval: int = _f(10, "Steps between log lines.")
    save_interval: int = _f(500, "Steps between checkpoints; the last step is always saved.")
    keep_last: int = _f(3, "Checkpoints to keep; 0 keeps all.")
    compile: bool = _f(False, "torch.compile each block in place (parameter names, and checkpoints, unchanged).")
    peak_flops: float = _f(0.0, "Peak FLOP/s of one device for MFU; 0 measures a matmul at start.")
    decay_steps: int = _f(0, "Step at which the cosine decay reaches its minimum; 0 means train.steps.")
    warmup_tokens: int = _f(0, "Linear warmup length in tokens (used when decay_tokens > 0).")
    decay_tokens: int = _f(
        0, "If > 0, schedule the LR by consumed tokens (MT-NLG: warmup 1B, decay 340B) instead of steps."
    )
    weight_decay_position_embedding: bool = _f(True, "Apply weight decay to the position embeddings.")
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (cuda when available).")
    out: str = _f("runs/run", "Run directory (--out): step checkpoints, log.jsonl, loss.png.")
    tensorboard: bool = _f(False, "Also log to TensorBoard (needs the tensorboard package).")
    exit_interval: int = _f(
        0, "Stop after this many steps of this job (checkpoint saved; --resume continues); 0: no limit."
    )
    exit_duration_mins: float = _f(
        0.0, "Stop (checkpoint saved) once this job has run this many minutes; 0: no limit. Leave room "
        "for one step and one save below the cluster's wall-clock limit."
    )

    def validate(self) -> None:
        if self.micro_batch_size < 1 or self.global_batch_size < 1 or self.steps < 0:
            raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1, steps >= 0")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.rampup_batch_size and len(self.rampup_batch_size) != 3:
            raise ConfigError("train.rampup_batch_size needs three numbers: start, increment, ramp_samples")
        if min(self.warmup_steps, self.decay_steps, self.warmup_tokens, self.decay_tokens) < 0:
            raise ConfigError("train.warmup_steps, decay_steps, warmup_tokens and decay_tokens must be >= 0")
        if self.eval_interval < 0 or self.log_interval < 1 or self.save_interval < 0:
            raise ConfigError("train.eval_interval and save_interval must be >= 0, log_interval >= 1")
        if self.exit_interval < 0 or self.exit_duration_mins < 0:
            raise ConfigError("train.exit_interval and train.exit_duration_mins must be >= 0 (0: no limit)")


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning (``mtnlg finetune``): the checkpoint it starts from and the instruction data."""

    checkpoint: str = _f(
        "", "Checkpoint to start from (--checkpoint): a run directory, a step, an export, an HF conversion."
    )
    data: list[str] = _f(
        [], "JSONL files (--data) of {'prompt', 'completion'} or {'messages': [{'role', 'content'}, ...]} records."
    )
    pack: bool = _f(True, "Pack records into full sequences (no attention across them); false pads one per sequence.")
    valid_fraction: float = _f(0.05, "Share of the records held out for the validation loss.")
    max_bad_records: int = _f(100, "Stop with an error when more records than this are bad; 0: at the first one.")

    def validate(self) -> None:
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"finetune.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.max_bad_records < 0:
            raise ConfigError(f"finetune.max_bad_records must be >= 0, got {self.max_bad_records}")


@dataclass
class GenerateConfig:
    """Sampling defaults for generation and serving."""

    max_new_tokens: int = _f(64, "Tokens to generate after the prompt.")
    temperature: float = _f(1.0, "Softmax temperature; 0 means greedy.")
    top_k: int = _f(0, "Sample among the k most likely tokens; 0 disables.")
    top_p: float = _f(1.0, "Sample from the smallest set with probability mass >= p; 1 disables.")
    repetition_penalty: float = _f(1.0, "Divide logits of already-seen tokens by this (CTRL style).")
    seed: int = _f(0, "Seed of the sampler.")

    def validate(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or self.top_k < 0:
            raise ConfigError("generate.max_new_tokens, temperature and top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generate.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError("generate.repetition_penalty must be positive")


@dataclass
class Config:
    """Everything a run needs. Built from a preset, a TOML file and CLI overrides, in that order."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> Config:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        cfg = cls()
        update(cfg, data, source)
        return cfg.validate()


def _section_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _unknown(kind: str, name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"{where}: unknown {kind} {name!r}{hint}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a TOML/JSON/CLI value to the field's declared type, or raise a ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = _parse_list(value, where)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, where) for v in value]
    if origin in (typing.Union, types.UnionType):
        return value  # Optional fields are not used yet; keep the raw value.
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _parse_list(text: str, where: str) -> list[Any]:
    """A list given on the command line: ``4,4,8``, ``4 4 8`` or TOML's ``[4, 4, 8]`` / ``['a', 'b']``."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            return list(tomllib.loads(f"v = {text}")["v"])
        except tomllib.TOMLDecodeError:
            text = text[1:-1]  # [a, b]: unquoted words, as in the comma form
    items = text.replace(",", " ").split()
    if any(item.startswith(("[", "]")) or item.endswith(("[", "]")) for item in items):
        raise ConfigError(f"{where}: cannot read {text!r} as a list: write 4,4,8 or [4, 4, 8]")
    return items


def set_field(cfg: Config, dotted: str, value: Any, where: str = "override") -> None:
    """Set ``section.field`` on ``cfg`` with type conversion; unknown names are errors."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{where}: expected section.field, got {dotted!r}")
    section_name, field_name = parts
    if section_name not in _section_names(cfg):
        raise _unknown("section", section_name, _section_names(cfg), where)
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if field_name not in hints:
        raise _unknown(f"field of [{section_name}]", field_name, _section_names(section), where)
    setattr(section, field_name, _coerce(value, hints[field_name], f"{where}: {dotted}"))


def update(cfg: Config, data: dict[str, Any], source: str) -> None:
    """Apply a nested mapping ``{section: {field: value}}`` (as read from TOML/JSON)."""
    for section_name, values in data.items():
        if section_name not in _section_names(cfg):
            raise _unknown("section", section_name, _section_names(cfg), source)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table of fields, got {values!r}")
        for name, value in values.items():
            set_field(cfg, f"{section_name}.{name}", value, source)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (or, with PyYAML installed, YAML) config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from None
        return yaml.safe_load(text) or {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Turn ``--model.hidden=512`` / ``--model.hidden 512`` into (dotted, value) pairs."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognized argument {arg!r}: overrides look like --section.field=value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args):
            i += 1
            value = args[i]
        else:
            raise ConfigError(f"override {arg!r} needs a value")
        pairs.append((key, value))
        i += 1
    return pairs


def build_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    base: Config | None = None,
) -> Config:
    """Preset, then file, then CLI overrides, on top of ``base`` (a resumed run's saved config;
    default: the dataclass defaults); the result is validated. ``base`` is not modified."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    return apply_settings(cfg, preset, file, overrides).validate()


def apply_settings(
    cfg: Config, preset: str | None = None, file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Apply a preset, a file and overrides to ``cfg`` in place, without validating the result."""
    from mtnlg.presets import get_preset

    if preset:
        cfg.model = get_preset(preset)
    if file:
        update(cfg, load_file(file), str(file))
    for key, value in parse_overrides(overrides or []):
        set_field(cfg, key, value, f"--{key}")
    return cfg


def field_help(section_cls: type) -> dict[str, str]:
    """Help text of each field of a config section, for --help and the README reference."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(section_cls)}


def changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(section.field, old value, new value)`` for every field that differs, in declaration order."""
    before, after = old.to_dict(), new.to_dict()
    return [(f"{section}.{name}", before[section][name], value)
            for section, values in after.items() for name, value in values.items()
            if before[section][name] != value]
