"""Memory per GPU: weights, gradients, optimizer state and activations of the fullest pipeline rank.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4), written per element size so fp32 runs can be checked too. For one
layer, sequence length s, micro-batch b, hidden h, a heads, tp degree t and e bytes per element:

    e*sbh * (4 + 12/t)       LayerNorm inputs (2), QKV and fc1 inputs (2): replicated over tp
                             (/t with sequence parallelism); Q K V (3), attention output (1),
                             GELU input and output (4 + 4): split by tp
    + 2*sbh (/t with SP)     the two residual dropout masks (1 byte each), when dropout > 0
    + e*a*s^2*b / t          softmax output (with dropout: + 1-byte mask + e*as^2b dropped copy);
                             flash attention keeps the fp32 log-sum-exp (4*asb/t) instead

With e = 2 and dropout this is the paper's ``sbh (10 + 24/t + 5as/ht)`` (``34/t`` with sequence
parallelism). Selective recomputation drops the attention-core terms; full recomputation keeps
only each layer's input (e*sbh, /t with SP) plus one layer's full activations while it is
recomputed. The first pipeline rank holds ``in_flight`` micro-batches of its layers.

Context parallelism (``cp``) gives each rank s / cp tokens of every sequence: every term above
uses s / cp, and ring attention (``mtnlg.parallel.context``) keeps no scores, only its fp32 output
and log-sum-exp (4 s b h / (cp t) + 4 a s b / (cp t)) and, with grouped-query heads, the key and
value blocks expanded to every head (2 e s b h / (cp t)). Weights and their sharding do not change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mtnlg.config import ConfigError, ModelConfig
from mtnlg.config.schedules import layer_split, stage_ids
from mtnlg.model.counts import TRAIN_STATE_BYTES, parameter_count
from mtnlg.planner.layout import Layout, in_flight, layers_per_rank, local_seq_len

GIB = float(1 << 30)

# Bytes per parameter of each training-state part, by precision: the same at every precision (see
# ``TRAIN_STATE_BYTES``).
STATE_BYTES = dict.fromkeys(("bf16", "fp16", "fp32"), TRAIN_STATE_BYTES)
MUON_BYTES = 4  # ``--optimizer muon``: one fp32 momentum buffer per element of the blocks' matrices


def muon_parameters(cfg: ModelConfig, layers: float, tp: int) -> float:
    """Elements of ``layers`` layers' matrices that Muon updates (attention, dense MLP and the stacked expert
    weights; not the MoE router, which AdamW updates), split by tp. MoE layers are averaged in."""
    C, HD, GD = cfg.hidden, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attention = C * (HD + 2 * GD) + HD * C
    matrices = 3 if cfg.mlp == "swiglu" else 2
    moe_share = cfg.moe_layers / cfg.n_layers
    mlp = (1.0 - moe_share) * matrices * C * cfg.ffn_size
    if cfg.moe_experts:
        mlp += moe_share * cfg.moe_experts * matrices * C * cfg.expert_ffn_size
    return layers * (attention + mlp) / tp


def optimizer_bytes(cfg: ModelConfig, lay: Layout, params: float, layers: float) -> float:
    """Unsharded optimizer state of ``params`` parameters of which ``layers`` layers: AdamW's two moments
    (``STATE_BYTES``), or under Muon one momentum for the blocks' matrices and AdamW's two for the rest."""
    adamw = STATE_BYTES[lay.precision][2]
    if lay.optimizer != "muon":
        return params * adamw
    matrices = muon_parameters(cfg, layers, lay.tp)
    return matrices * MUON_BYTES + (params - matrices) * adamw


@dataclass
class Memory:
    """Bytes on the fullest GPU, by part; ``total`` is their sum."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    gathered_weights: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.gathered_weights

    def gib(self) -> dict[str, float]:
        parts = {k: v / GIB for k, v in asdict(self).items()}
        return {**parts, "total": self.total / GIB}


def rank_parameters(cfg: ModelConfig, lay: Layout, *, first: bool, last: bool, layers: int | None = None) -> float:
    """Parameters held by one tp rank of a pipeline rank (``layers``; default: the busiest rank's count).

    Column- and row-parallel weights and the column-parallel biases are split by tp; the norms (QK-norm
    gains included) and row-parallel output biases are replicated (GPT: 4C + 2C per layer). The first
    rank holds the vocabulary-parallel embedding (and the replicated position embedding, if learned),
    the last the output layer: a copy of the tied embedding when they are on different ranks.
    """
    counts = parameter_count(cfg)
    norm = 2 * cfg.hidden if cfg.norm == "layernorm" else cfg.hidden  # gain (and LayerNorm's bias)
    replicated = 2 * norm + (2 * cfg.hidden if cfg.bias else 0) + (2 * cfg.head_dim if cfg.qk_norm else 0)
    per_layer = (counts["per_layer"] - replicated) / lay.tp + replicated
    params = (layers_per_rank(cfg, lay) if layers is None else layers) * per_layer
    vocab = cfg.padded_vocab_size * cfg.hidden / lay.tp
    if first:
        params += vocab + (cfg.seq_len * cfg.hidden if cfg.position == "learned" else 0)
    if last:
        params += norm  # the final norm
        if not cfg.tie_embeddings or not first:
            params += vocab
    return params


def layer_activation_bytes(cfg: ModelConfig, lay: Layout, recompute: str | None = None) -> float:
    """Bytes one layer saves for backward for one micro-batch (see the module docstring)."""
    recompute = recompute or lay.recompute
    s, b, h, a, t, e = local_seq_len(cfg, lay), lay.micro_batch, cfg.hidden, cfg.n_heads, lay.tp, lay.element_bytes
    sp = t if lay.sequence_parallel else 1
    sbh = s * b * h
    if recompute == "full":
        return e * sbh / sp
    masks = 2 * sbh / sp if cfg.dropout > 0 else 0.0
    total = e * sbh * (4 / sp + 12 / t) + masks
    if recompute == "selective":
        return total
    if lay.cp > 1:  # ring attention's saved output and log-sum-exp (fp32), and expanded grouped-query blocks
        return total + 4 * s * b * h / t + 4 * a * s * b / t + (2 * e * s * b * h / t if cfg.kv_heads < a else 0.0)
    if lay.flash_attention:
        return total + 4 * a * s * b / t
    per_score = (2 * e + 1) if cfg.dropout > 0 else e
    return total + per_score * a * s * s * b / t


def head_activation_bytes(cfg: ModelConfig, lay: Layout) -> float:
    """The last rank's output end for one micro-batch: final LayerNorm input and output, and the fp32
    log-softmax the cross-entropy keeps (vocabulary-parallel: split by tp)."""
    s, b, h, e = local_seq_len(cfg, lay), lay.micro_batch, cfg.hidden, lay.element_bytes
    sp = lay.tp if lay.sequence_parallel else 1
    return 2 * e * s * b * h / sp + 4 * s * b * cfg.padded_vocab_size / lay.tp


def activation_bytes(cfg: ModelConfig, lay: Layout, *, first: bool, last: bool) -> float:
    """Peak activations of a pipeline rank: its layers times the micro-batches in flight (first rank)
    or one (last rank), plus the working set of one recomputed layer and the output end."""
    layers = layers_per_rank(cfg, lay)
    flight = in_flight(lay) if first else 1.0
    total = layers * flight * layer_activation_bytes(cfg, lay)
    if lay.recompute != "none":  # the recomputed part of one layer exists again during its backward
        total += layer_activation_bytes(cfg, lay, "none") - layer_activation_bytes(cfg, lay, lay.recompute)
    if last:
        total += head_activation_bytes(cfg, lay)
    return total


def rank_memory(cfg: ModelConfig, lay: Layout, *, first: bool, last: bool) -> Memory:
    """Memory of one pipeline rank with ZeRO stage ``lay.zero`` over its ``dp`` data-parallel peers."""
    params = rank_parameters(cfg, lay, first=first, last=last)
    w, g, _ = STATE_BYTES[lay.precision]
    shard = float(lay.dp)
    gathered = 0.0
    if lay.zero >= 3:  # FSDP: the current and the prefetched layer are unsharded while they run
        per_layer = rank_parameters(cfg, lay, first=False, last=False) / layers_per_rank(cfg, lay)
        gathered = 2 * per_layer * lay.element_bytes
    return Memory(
        weights=params * w / (shard if lay.zero >= 3 else 1.0),
        gradients=params * g / (shard if lay.zero >= 2 else 1.0),
        optimizer=optimizer_bytes(cfg, lay, params, layers_per_rank(cfg, lay)) / (shard if lay.zero >= 1 else 1.0),
        activations=activation_bytes(cfg, lay, first=first, last=last),
        gathered_weights=gathered,
    )


def peak_memory(cfg: ModelConfig, lay: Layout) -> Memory:
    """The fuller of the first and last pipeline ranks (the same rank when pp = 1)."""
    if lay.pp == 1:
        return rank_memory(cfg, lay, first=True, last=True)
    first = rank_memory(cfg, lay, first=True, last=False)
    last = rank_memory(cfg, lay, first=False, last=True)
    return first if first.total >= last.total else last


def rank_state(cfg: ModelConfig, lay: Layout, rank: int) -> dict[str, object]:
    """Rank ``rank``'s stages, layers and bytes of weights, gradients and optimizer state as mtnlg
    allocates them (``STATE_BYTES``), each divided by dp where ``lay.zero`` shards it (3: all three;
    2: gradients and moments; 1: moments). ``mtnlg train --dry-run`` reports the same names, measured
    on the real objects. Ranks are numbered as the trainer's mesh numbers them (pp-major, tp-minor).
    """
    if not 0 <= rank < lay.gpus:
        raise ConfigError(f"plan: --rank {rank} is not a rank of --gpus {lay.gpus} (0 .. {lay.gpus - 1})")
    pp_rank = rank // (lay.dp * lay.cp * lay.tp)
    num_stages = lay.pp * lay.virtual_stages
    stages = stage_ids(pp_rank, lay.pp, lay.virtual_stages, lay.schedule) if lay.pp > 1 else [0]
    split = layer_split(cfg.n_layers, num_stages)
    layers = sorted(layer for s in stages for layer in split[s])
    params = rank_parameters(cfg, lay, first=0 in stages, last=num_stages - 1 in stages, layers=len(layers))
    zero = lay.zero if lay.dp > 1 else 0
    per_element = (*STATE_BYTES[lay.precision][:2], optimizer_bytes(cfg, lay, params, len(layers)) / params)
    w, g, o = (b * params / (lay.dp if zero >= level else 1) for b, level in zip(per_element, (3, 2, 1), strict=True))
    return {"rank": rank, "stage": stages[0], "stages": stages, "layers": [layers[0], layers[-1]],
            "parameters": int(params), "parameter_bytes": int(w), "gradient_bytes": int(g), "optimizer_bytes": int(o)}
