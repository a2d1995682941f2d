"""Hugging Face GPT-2 <-> mtnlg: one table of names, read in both directions.

Differences handled here, and only here:
- HF's ``Conv1D`` stores weights as (in, out); ``nn.Linear`` stores (out, in): transpose.
- HF's fused ``c_attn`` output is [all q | all k | all v]; mtnlg groups rows per head
  ([q_h; k_h; v_h] for each head h) so tensor parallelism can split whole heads: permute.
- mtnlg may pad the vocabulary; export drops the padding rows.

Pure tensor and dict work: reading and writing the directories is ``mtnlg.checkpoint.convert``'s.
"""

from __future__ import annotations

from typing import Any

import torch

from mtnlg.config.sections import ModelConfig

# (HF name, mtnlg name, how the tensor differs) for the tensors outside the blocks ...
GLOBAL_NAMES = (
    ("wte.weight", "wte.weight", "vocab"),
    ("wpe.weight", "wpe.weight", "same"),
    ("ln_f.weight", "ln_f.weight", "same"),
    ("ln_f.bias", "ln_f.bias", "same"),
)
# ... and for those of block i, under "h.{i}." (HF) and "blocks.{i}." (mtnlg).
BLOCK_NAMES = (
    ("ln_1.weight", "ln_1.weight", "same"),
    ("ln_1.bias", "ln_1.bias", "same"),
    ("ln_2.weight", "ln_2.weight", "same"),
    ("ln_2.bias", "ln_2.bias", "same"),
    ("attn.c_attn.weight", "attn.qkv_proj.weight", "qkv_conv1d"),
    ("attn.c_attn.bias", "attn.qkv_proj.bias", "qkv"),
    ("attn.c_proj.weight", "attn.out_proj.weight", "conv1d"),
    ("attn.c_proj.bias", "attn.out_proj.bias", "same"),
    ("mlp.c_fc.weight", "mlp.fc_in.weight", "conv1d"),
    ("mlp.c_fc.bias", "mlp.fc_in.bias", "same"),
    ("mlp.c_proj.weight", "mlp.fc_out.weight", "conv1d"),
    ("mlp.c_proj.bias", "mlp.fc_out.bias", "same"),
)
# HF activation_function -> model.activation (the first of each is what an export writes).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _hf_qkv_to_per_head(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(3C, ...) rows [q | k | v] -> rows [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]."""
    return w.reshape(3, n_heads, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _per_head_to_hf_qkv(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return w.reshape(n_heads, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _names(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """Every (HF name, mtnlg name, kind) of a model, the output layer when it is not tied."""
    names = list(GLOBAL_NAMES)
    for i in range(cfg.n_layers):
        names += [(f"h.{i}.{hf}", f"blocks.{i}.{ours}", kind) for hf, ours, kind in BLOCK_NAMES]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", "vocab"))
    return names


def _to_mtnlg(t: torch.Tensor, kind: str, cfg: ModelConfig) -> torch.Tensor:
    if kind == "conv1d":
        return t.t()
    if kind in ("qkv", "qkv_conv1d"):
        return _hf_qkv_to_per_head(t.t() if kind == "qkv_conv1d" else t, cfg.n_heads)
    return t


def _to_hf(t: torch.Tensor, kind: str, cfg: ModelConfig) -> torch.Tensor:
    if kind == "conv1d":
        return t.t()
    if kind in ("qkv", "qkv_conv1d"):
        t = _per_head_to_hf_qkv(t, cfg.n_heads)
        return t.t() if kind == "qkv_conv1d" else t
    if kind == "vocab":
        return t[: cfg.vocab_size]  # the padding rows dropped
    return t


def hf_state_to_mtnlg(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF GPT-2 state dict (``transformer.`` prefix or none) in mtnlg's names and layout."""
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    out = {ours: _to_mtnlg(hf_state[hf], kind, cfg).contiguous() for hf, ours, kind in _names(cfg)}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    return out


def mtnlg_state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An mtnlg state dict as ``GPT2LMHeadModel`` names it (``transformer.`` prefix, no vocabulary padding)."""
    return {
        (hf if hf == "lm_head.weight" else f"transformer.{hf}"): _to_hf(state[ours], kind, cfg).contiguous()
        for hf, ours, kind in _names(cfg)
    }


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map an HF ``GPT2Config`` dict onto ModelConfig (no vocabulary padding, for exact parity)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation_function {act!r}; supported: {', '.join(ACTIVATIONS)}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"HF config sets {flag}, which mtnlg's attention does not implement")
    if hf.get("scale_attn_weights") is False:
        raise ValueError("HF config disables scale_attn_weights; mtnlg always scales by 1/sqrt(head_dim)")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        seq_len=hf["n_positions"],
        n_layers=hf["n_layer"],
        hidden=hf["n_embd"],
        n_heads=hf["n_head"],
        ffn_hidden=hf.get("n_inner") or 0,
        dropout=0.0,
        layernorm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        padded_vocab_multiple=1,
        activation=ACTIVATIONS[act],
    )


def hf_config(m: ModelConfig, eos_id: int) -> dict[str, Any]:
    """The ``config.json`` of an exported GPT-2 directory: ``model_config_from_hf``'s inverse."""
    activation = next(hf for hf, ours in ACTIVATIONS.items() if ours == m.activation)
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": m.vocab_size,
        "n_positions": m.seq_len,
        "n_embd": m.hidden,
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_inner": m.ffn_hidden or None,
        "activation_function": activation,
        "layer_norm_epsilon": m.layernorm_eps,
        "initializer_range": m.init_std,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }
