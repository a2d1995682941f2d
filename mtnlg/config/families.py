"""The switches that make a block GPT-, Llama-, Mistral- or Qwen-style, or mixture-of-experts, and their
validation.

Kept beside ``sections.py`` (which declares the fields) so the schema file stays one screenful per concern.
"""

from __future__ import annotations

from typing import Any

from mtnlg.config.errors import ConfigError

POSITIONS = ("learned", "rope")
# what an inference loader may override to run a trained model at another context (mtnlg.model.rope.extend_context)
CONTEXT_FIELDS = ("seq_len", "rope_scaling", "rope_factor", "rope_original_len")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
MOE_BALANCE = ("aux", "bias", "aux+bias", "none")
RECOMPUTE = ("none", "selective", "full")


def recompute_mode(self: Any) -> str:
    """What ``ModelConfig`` (``self``) recomputes in backward: ``model.recompute``, with the older
    ``model.activation_checkpointing=true`` meaning full."""
    return "full" if self.activation_checkpointing else self.recompute


def validate_family(self: Any) -> None:
    """The block-family switches of ``ModelConfig`` (``self``), each error naming its field."""
    if self.recompute not in RECOMPUTE:
        raise ConfigError(f"model.recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
    if self.activation_checkpointing and self.recompute not in ("none", "full"):
        raise ConfigError(f"model.activation_checkpointing=true means model.recompute=full, which contradicts "
                          f"model.recompute={self.recompute}: set model.recompute alone")
    for name, allowed in (("position", POSITIONS), ("rope_scaling", ROPE_SCALINGS), ("norm", NORMS), ("mlp", MLPS)):
        if getattr(self, name) not in allowed:
            raise ConfigError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
    if self.n_kv_heads < 0 or self.head_size < 0:
        raise ConfigError("model.n_kv_heads and model.head_size must be >= 0 (0: n_heads, hidden / n_heads)")
    if self.n_heads % self.kv_heads:
        raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}: "
                          "each key/value head serves a whole group of query heads")
    if self.position == "rope":
        if self.head_dim % 2 or self.rope_theta <= 1:
            raise ConfigError(f"model.position=rope needs an even head dimension (got {self.head_dim}) and "
                              f"model.rope_theta > 1 (got {self.rope_theta})")
        if self.rope_scaling != "none" and self.rope_factor < 1:
            raise ConfigError(f"model.rope_factor must be >= 1, got {self.rope_factor}")
        if self.rope_scaling in ("llama3", "yarn") and self.rope_original_len <= 0:
            raise ConfigError(f"model.rope_scaling={self.rope_scaling} needs model.rope_original_len > 0 "
                              "(the pretraining context length)")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError("model.rope_low_freq_factor must be positive and below model.rope_high_freq_factor")
    elif self.rope_scaling != "none":
        raise ConfigError(f"model.rope_scaling={self.rope_scaling} needs model.position=rope")


def validate_moe(self: Any) -> None:
    """The mixture-of-experts fields of ``ModelConfig`` (``self``), each error naming its field."""
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
