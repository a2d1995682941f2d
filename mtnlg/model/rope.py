"""Rotary position embeddings (Su et al. 2021) and the context-extension rules the families use.

Frequencies follow Hugging Face's ``modeling_rope_utils`` exactly (fp32, the same formulas), so
an imported Llama/Mistral/Qwen model gives transformers' logits:
    inv_freq_i = theta^(-2i / D) for i < D/2  (D = head_dim)
    linear     inv_freq / factor                               (position interpolation)
    llama3     long wavelengths / factor, short ones kept, a smooth ramp in between (Llama 3.1)
    yarn       interpolation blended with extrapolation by a ramp over dimensions, cos and sin
               scaled by 0.1 ln(factor) + 1 (Peng et al. 2023; Qwen's long-context setting)
Rotation uses the "half" layout (rotate_half: the first D/2 dimensions pair with the last D/2),
the layout of HF's checkpoints, so q/k projection weights are imported unpermuted.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch

from mtnlg.config import ConfigError, ModelConfig
from mtnlg.config.families import CONTEXT_FIELDS


def _yarn(inv_freq: torch.Tensor, cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor, original = cfg.rope_theta, cfg.rope_factor, cfg.rope_original_len

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for the high-frequency dimensions, which keep their frequency
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0


def _llama3(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    factor, low_f, high_f, original = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, \
        cfg.rope_original_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low_f, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high_f) & (wavelen <= original / low_f)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(D/2,) fp32 inverse frequencies and the factor cos and sin are scaled by."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor, 1.0
    if cfg.rope_scaling == "llama3":
        return _llama3(inv_freq, cfg), 1.0
    if cfg.rope_scaling == "yarn":
        return _yarn(inv_freq, cfg, dim)
    return inv_freq, 1.0


def rope_cos_sin(cfg: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B or 1, 1, T, D) for ``position_ids`` (B or 1, T), computed in fp32, cast to ``dtype``."""
    inv_freq, scale = inverse_frequencies(cfg)
    device = position_ids.device.type  # meta (a dry run) has no autocast to switch off
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        freqs = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)  # (B, T, D/2)
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # (B, 1, T, D)
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by the angles of its positions: x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def extend_context(cfg: ModelConfig, **given: object) -> str:
    """Run a trained model at another context length: set the ``CONTEXT_FIELDS`` given (in place, before
    or after its weights load: the rotary tables are computed from ``cfg`` at every forward), validated;
    a line saying what changed.

    A RoPE scaling given without ``rope_original_len`` keeps the model's (or takes its trained length),
    and without ``rope_factor`` takes new length / original length. Learned positions have one table
    row per trained position: such a model runs at its length or shorter only.
    """
    unknown = set(given) - set(CONTEXT_FIELDS)
    if unknown:
        raise ConfigError(f"model.{sorted(unknown)[0]} cannot be changed at load; these can: "
                          + ", ".join(f"model.{f}" for f in CONTEXT_FIELDS))
    trained = cfg.seq_len
    seq_len = int(given.get("seq_len") or trained)  # type: ignore[call-overload]
    if seq_len < 1:
        raise ConfigError(f"model.seq_len must be >= 1, got {seq_len}")
    if cfg.position == "learned" and (seq_len > trained or set(given) - {"seq_len"}):
        raise ConfigError(f"model.seq_len={seq_len} with model.position=learned: its position table has {trained} "
                          "rows; only a rotary (model.position=rope) model's context extends, with a RoPE scaling")
    scaling = str(given.get("rope_scaling") or cfg.rope_scaling)
    changes: dict = {"seq_len": seq_len, "rope_scaling": scaling}
    if "rope_scaling" in given and scaling != "none":
        original = int(given.get("rope_original_len") or cfg.rope_original_len or trained)  # type: ignore[call-overload]
        changes["rope_original_len"] = original
        changes["rope_factor"] = float(given.get("rope_factor") or max(seq_len / original, 1.0))  # type: ignore[arg-type]
    else:
        changes |= {k: given[k] for k in ("rope_factor", "rope_original_len") if k in given}
    dataclasses.replace(cfg, **changes).validate()  # nothing changes unless all of it is valid
    for name, value in changes.items():
        setattr(cfg, name, value)
    rope = f", rope_scaling={scaling} factor {cfg.rope_factor:g} from {cfg.rope_original_len}"
    return f"context: {seq_len} tokens (trained at {trained})" + (rope if scaling != "none" else "")
