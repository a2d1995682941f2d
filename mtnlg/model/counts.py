"""Scale arithmetic: parameter counts, FLOPs per token and memory, computed from the config alone.

Nothing is allocated, so ``mtnlg info --preset mt-nlg-530b`` runs on a laptop. Tests check
these formulas against a model built on the meta device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mtnlg.config import ModelConfig


def _mlp_params(cfg: ModelConfig, C: int, F: int) -> int:
    """A dense MLP (or one expert): C -> F -> C, SwiGLU with a third (gate) matrix."""
    matrices = 3 if cfg.mlp == "swiglu" else 2
    biases = (matrices - 1) * F + C if cfg.bias else 0
    return matrices * C * F + biases


def _attention_params(cfg: ModelConfig) -> int:
    """q (C x H D), k and v (C x G D each), out (H D x C), their biases, the QK-norm gains."""
    C, HD, GD = cfg.hidden, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    qkv_bias = HD + 2 * GD if cfg.bias or cfg.qkv_bias else 0
    out_bias = C if cfg.bias else 0
    qk_norm = 2 * cfg.head_dim if cfg.qk_norm else 0
    return C * (HD + 2 * GD) + qkv_bias + HD * C + out_bias + qk_norm


def _norm_params(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden if cfg.norm == "layernorm" else cfg.hidden  # RMSNorm has a gain, no bias


def parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part. ``total`` counts the tied output layer once; ``active`` is what one token
    uses (a MoE layer's router, shared expert and k of its E experts); ``per_layer`` is a dense block."""
    C, F, L = cfg.hidden, cfg.ffn_size, cfg.n_layers
    attention = _attention_params(cfg)
    layernorms = 2 * _norm_params(cfg)
    per_layer = attention + _mlp_params(cfg, C, F) + layernorms
    expert = _mlp_params(cfg, C, cfg.expert_ffn_size)
    shared = _mlp_params(cfg, C, F) if cfg.moe_shared_expert else 0
    moe_layer = attention + layernorms + C * cfg.moe_experts + cfg.moe_experts * expert + shared
    n_moe = cfg.moe_layers
    embedding = cfg.padded_vocab_size * C + (cfg.seq_len * C if cfg.position == "learned" else 0)
    output = 0 if cfg.tie_embeddings else cfg.padded_vocab_size * C
    total = embedding + (L - n_moe) * per_layer + n_moe * moe_layer + _norm_params(cfg) + output
    return {
        "total": total,
        "active": total - n_moe * (cfg.moe_experts - cfg.moe_top_k) * expert,
        "embedding": embedding,
        "per_layer": per_layer,
        "non_embedding": total - embedding - output,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Matmul FLOPs per token (PaLM's convention: 2 per multiply-add, attention not halved for causality).

    forward = 2 * (matmul parameters) + 4 * L * T * H * D, where the matmul parameters are every
    layer's Linear weights (grouped-query k/v and SwiGLU's third matrix as they are) plus the output
    layer (V x C) and 4*L*T*H*D covers QK^T and AV (H D = C for GPT shapes);
    training = 3 * forward (backward costs two forwards). Activation recomputation is not counted,
    so MFU from these numbers is the model FLOPs utilisation, not hardware utilisation.
    """
    T = seq_len or cfg.seq_len
    C, F, L, V = cfg.hidden, cfg.ffn_size, cfg.n_layers, cfg.padded_vocab_size
    HD, GD = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    mlp_matrices = 3 if cfg.mlp == "swiglu" else 2
    n_moe = cfg.moe_layers  # a MoE layer: router, k experts and the shared expert instead of the dense MLP
    moe_mlp = C * cfg.moe_experts + (cfg.moe_top_k * cfg.expert_ffn_size + cfg.moe_shared_expert * F) * mlp_matrices * C
    attention = C * (HD + 2 * GD) + HD * C
    matmul_params = L * attention + (L - n_moe) * mlp_matrices * C * F + n_moe * moe_mlp + V * C
    forward = 2 * matmul_params + 4 * L * T * HD
    return {"forward": float(forward), "train": 3.0 * forward}


# Bytes per parameter of the training state (weights, gradients, optimizer) as mtnlg train allocates
# them at every precision: the weights stay fp32 (they are the master weights; autocast, or FSDP's mixed
# precision, computes on 16-bit copies that do not outlive a layer), fp32 gradients and AdamW's two fp32
# moments: 16 B. (Megatron keeps a 16-bit copy beside fp32 master weights, 2 + 4 + 12 = 18 B, and its
# ZeRO-1 shards the 12; mtnlg's shards the 8 of the moments.)
TRAIN_STATE_BYTES = (4, 4, 8)


@dataclass
class ModelInfo:
    """What ``mtnlg info`` prints."""

    parameters: int
    active_parameters: int
    non_embedding_parameters: int
    padded_vocab_size: int
    forward_flops_per_token: float
    train_flops_per_token: float
    weights_gib_bf16: float
    train_state_gib: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def model_info(cfg: ModelConfig) -> ModelInfo:
    """Summary numbers; the training state is what ``mtnlg train`` allocates per parameter
    (``TRAIN_STATE_BYTES``), the same figure the planner uses."""
    params = parameter_count(cfg)
    flops = flops_per_token(cfg)
    gib = float(1 << 30)
    return ModelInfo(
        parameters=params["total"],
        active_parameters=params["active"],
        non_embedding_parameters=params["non_embedding"],
        padded_vocab_size=cfg.padded_vocab_size,
        forward_flops_per_token=flops["forward"],
        train_flops_per_token=flops["train"],
        weights_gib_bf16=2 * params["total"] / gib,
        train_state_gib=sum(TRAIN_STATE_BYTES) * params["total"] / gib,
    )
