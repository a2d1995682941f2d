"""The configuration's schema: one dataclass per concern, each field with its default and help.

There is no global argument object: a ``Config`` is built once (preset -> file -> overrides, in
``mtnlg.config.build``), validated, and passed explicitly. Every field carries its help text in
``metadata["help"]`` so ``--help``, the reference and error messages can explain it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from mtnlg.config.errors import ConfigError
from mtnlg.config.families import validate_family, validate_moe
from mtnlg.config.recipe import validate_recipe
from mtnlg.config.sampling import SAMPLING, sampling_help
from mtnlg.config.schedules import SCHEDULES


def _f(default: Any, help: str, runtime: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with its help text (mutable defaults go through a factory).

    ``runtime``: a model field that changes neither the parameters' shapes nor their meaning, so a
    checkpoint loads (and a run resumes) with another value of it.
    """
    metadata = {"help": help, "runtime": runtime}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelConfig:
    """Shape of the decoder-only Transformer: GPT-2 / MT-NLG's block by default, Llama / Mistral / Qwen's
    by the family switches (position, norm, mlp, n_kv_heads, bias, qk_norm: docs/model-families.md)."""

    vocab_size: int = _f(50257, "Tokenizer vocabulary size (ids 0..vocab_size-1).")
    seq_len: int = _f(1024, "Context length: the number of learned position embeddings.")
    n_layers: int = _f(12, "Number of Transformer blocks.")
    hidden: int = _f(768, "Model width (embedding and residual stream size).")
    n_heads: int = _f(12, "Attention heads per block; hidden must be divisible by it.")
    ffn_hidden: int = _f(0, "MLP inner width (intermediate_size); 0 means 4 * hidden (gelu) or Llama's rule for "
                            "swiglu: 8/3 * hidden rounded up to a multiple of 256.")
    dropout: float = _f(0.0, "Dropout on embeddings, attention probabilities and residual branches.", runtime=True)
    layernorm_eps: float = _f(1e-5, "Epsilon of every normalisation layer (LayerNorm or RMSNorm: model.norm).")
    init_std: float = _f(0.02, "Std of the normal init; output projections use std / sqrt(2 * n_layers).")
    tie_embeddings: bool = _f(True, "Share the output layer's weight with the token embedding.")
    padded_vocab_multiple: int = _f(
        128, "Pad the embedding rows to a multiple of this (Megatron's make-vocab-size-divisible-by)."
    )
    activation: str = _f("gelu_tanh", "MLP activation: gelu_tanh (GPT-2) or gelu (exact erf).")
    position: str = _f("learned", "Positions: learned (absolute embeddings, GPT) or rope (rotary, Llama/Qwen).")
    rope_theta: float = _f(10000.0, "RoPE base wavelength (Llama 3: 500000, Qwen 3: 1000000).")
    rope_scaling: str = _f("none", "RoPE context extension: none, linear, llama3 (Llama 3.1) or yarn.")
    rope_factor: float = _f(1.0, "RoPE scaling factor (linear, llama3, yarn).")
    rope_original_len: int = _f(0, "Context length the RoPE model was pretrained at (llama3, yarn).")
    rope_low_freq_factor: float = _f(1.0, "llama3 scaling: wavelengths above original_len / this are scaled.")
    rope_high_freq_factor: float = _f(4.0, "llama3 scaling: wavelengths below original_len / this are kept.")
    rope_beta_fast: float = _f(32.0, "yarn: rotations bounding the extrapolated (kept) dimensions.")
    rope_beta_slow: float = _f(1.0, "yarn: rotations bounding the interpolated dimensions.")
    norm: str = _f("layernorm", "Normalisation layers: layernorm (GPT) or rmsnorm (Llama/Qwen).")
    mlp: str = _f("gelu", "MLP kind: gelu (Linear, GELU, Linear) or swiglu (down(silu(gate x) * up x)).")
    n_kv_heads: int = _f(0, "Key/value heads (grouped-query attention; 1 = multi-query); 0 means n_heads.")
    head_size: int = _f(0, "Dimensions per attention head; 0 means hidden / n_heads (Qwen 3 sets it).")
    bias: bool = _f(True, "Biases in every Linear layer of the blocks (GPT); off for Llama/Qwen.")
    qkv_bias: bool = _f(False, "Biases on the q, k, v projections even with model.bias off (Qwen 2).")
    qk_norm: bool = _f(False, "RMSNorm each head's queries and keys before RoPE (Qwen 3).")
    recompute: str = _f("none", "Activation recomputation in backward: none, selective (the attention core, "
                        "its s^2 part) or full (whole blocks).", runtime=True)
    activation_checkpointing: bool = _f(False, "Older spelling of model.recompute=full (kept for configs and "
                                        "checkpoints that set it).", runtime=True)
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
        if self.ffn_hidden or self.mlp != "swiglu":
            return self.ffn_hidden or 4 * self.hidden
        return 256 * -(-(8 * self.hidden // 3) // 256)  # Llama's rule: 2/3 of 4h, up to a multiple of 256

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

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
        return self.head_size or self.hidden // self.n_heads

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
        if self.hidden % self.n_heads and not self.head_size:
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
        validate_family(self)
        if self.moe_experts:
            validate_moe(self)


@dataclass
class ParallelConfig:
    """How the world of processes is split: dp x pp x cp x tp = world size."""

    tp: int = _f(1, "Tensor-parallel size: each layer's weights are split across this many ranks.")
    pp: int = _f(1, "Pipeline-parallel size: the layers are split into this many stages.")
    ep: int = _f(1, "Expert-parallel size: MoE experts split over this many of the data-parallel ranks.")
    cp: int = _f(1, "Context-parallel size: each sample's sequence split over this many ranks (ring attention).")
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
    zero: int = _f(
        3, "ZeRO stage over dp: 1 shards the optimizer state, 2 also the gradients, 3 also the weights (FSDP2)."
    )
    bucket_mb: float = _f(25.0, "ZeRO 1/2: MiB of gradients reduced (and of weights gathered) per collective.")
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
        for name in ("tp", "pp", "ep", "cp", "pp_stages_per_rank", "dp_replicate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.pp_microbatches < 0:
            raise ConfigError(f"parallel.pp_microbatches must be >= 0 (0: the accumulation steps), got "
                              f"{self.pp_microbatches}")
        if self.pp_schedule not in SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule!r} is unknown; choose one of "
                              f"{', '.join(SCHEDULES)}")
        if self.zero not in (1, 2, 3):
            raise ConfigError(f"parallel.zero must be 1 (optimizer state), 2 (+ gradients) or 3 (+ weights: FSDP), "
                              f"got {self.zero}")
        if not self.bucket_mb > 0:
            raise ConfigError(f"parallel.bucket_mb must be positive, got {self.bucket_mb}")
        if self.dp == 0 or self.dp < -1:
            raise ConfigError(f"parallel.dp must be >= 1 or -1 (derive), got {self.dp}")
        if not self.timeout_s > 0:
            raise ConfigError(f"parallel.timeout_s must be positive, got {self.timeout_s}")


@dataclass
class DataConfig:
    """Where training tokens come from and how they are split."""

    data_path: list[str] = _f(
        [], "Indexed dataset prefixes, each optionally preceded by its weight: a, or 0.3 a 0.7 b."
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
    precision: str = _f("fp32", "fp32, bf16 (autocast), fp16 (autocast + dynamic loss scaling) or fp8 (bf16 + "
                        "torchao float8 linears; CUDA compute capability >= 8.9).")
    optimizer: str = _f("adamw", "adamw, or muon: Muon for the blocks' 2-D matrices, AdamW for the rest.")
    muon_momentum: float = _f(0.95, "Muon's Nesterov momentum (train.optimizer=muon).")
    lr_schedule: str = _f("cosine", "cosine (warmup, cosine decay) or wsd (warmup, constant, linear decay at the end).")
    decay_fraction: float = _f(0.2, "wsd: the last fraction of the run after warmup (steps or tokens): the decay.")
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
    async_save: bool = _f(
        False, "Write checkpoints in the background (DCP async save): a save stalls training only to copy "
        "the state to shared CPU memory, which a writer process of each rank writes; the commit (checksums, "
        "rename, `latest`) follows the write. Needs /dev/shm larger than a rank's state. The last save of "
        "a job is synchronous."
    )
    straggler_threshold: float = _f(
        2.0, "Warn when a rank's busy time per step (the step minus its waits for other ranks) exceeds the "
        "median of the other ranks by this factor; 0: never."
    )

    def validate(self) -> None:
        if self.micro_batch_size < 1 or self.global_batch_size < 1 or self.steps < 0:
            raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1, steps >= 0")
        validate_recipe(self)
        if self.rampup_batch_size and len(self.rampup_batch_size) != 3:
            raise ConfigError("train.rampup_batch_size needs three numbers: start, increment, ramp_samples")
        if min(self.warmup_steps, self.decay_steps, self.warmup_tokens, self.decay_tokens) < 0:
            raise ConfigError("train.warmup_steps, decay_steps, warmup_tokens and decay_tokens must be >= 0")
        if self.eval_interval < 0 or self.log_interval < 1 or self.save_interval < 0:
            raise ConfigError("train.eval_interval and save_interval must be >= 0, log_interval >= 1")
        if self.exit_interval < 0 or self.exit_duration_mins < 0:
            raise ConfigError("train.exit_interval and train.exit_duration_mins must be >= 0 (0: no limit)")
        if self.straggler_threshold and self.straggler_threshold <= 1:
            raise ConfigError(f"train.straggler_threshold must be > 1 (a factor over the median) or 0 (off), "
                              f"got {self.straggler_threshold:g}")

    def batch_sizes(self) -> list[int]:
        """Every global batch size the run will use: the ramp-up sizes, then the final one."""
        sizes = {self.global_batch_size}
        if self.rampup_batch_size:
            start, increment, ramp_samples = self.rampup_batch_size
            if start < 1 or increment < 1 or ramp_samples < 0 or start > self.global_batch_size:
                raise ConfigError(
                    f"train.rampup_batch_size={self.rampup_batch_size}: need start >= 1, increment >= 1, "
                    f"ramp_samples >= 0 and start <= global_batch_size={self.global_batch_size}"
                )
            if (self.global_batch_size - start) % increment:
                raise ConfigError(
                    f"train.rampup_batch_size: global_batch_size - start = {self.global_batch_size - start} "
                    f"is not a multiple of increment={increment}"
                )
            sizes.update(range(start, self.global_batch_size, increment))
        return sorted(sizes)


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


def _sampling(name: str) -> Any:
    """A [generate] field whose default, range and help are ``SAMPLING[name]``'s (one table for the
    config, the engine, the HTTP schema and the CLI flags)."""
    return field(default=SAMPLING[name].default, metadata={"help": sampling_help(name), "runtime": False,
                                                           "sampling": name})


@dataclass
class GenerateConfig:
    """Sampling defaults for generation and serving."""

    max_new_tokens: int = _sampling("max_new_tokens")
    temperature: float = _sampling("temperature")
    top_k: int = _sampling("top_k")
    top_p: float = _sampling("top_p")
    repetition_penalty: float = _sampling("repetition_penalty")
    seed: int = _sampling("seed")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            try:
                SAMPLING[f.name].check(f"generate.{f.name}", getattr(self, f.name))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


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
