"""Named model shapes, from a CPU-sized ``tiny`` to MT-NLG 530B.

Shapes follow the published models: GPT-2 (Radford et al. 2019), GPT-3 XL (Brown et al. 2020)
GPT-3 175B, and Megatron-Turing NLG 530B (Smith et al. 2022: 105 layers, hidden 20480, 128 heads, 2048 tokens).
"""

from __future__ import annotations

import dataclasses

from mtnlg.config.sections import ConfigError, ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Trains in minutes on a 2-core CPU with the demo's 8k-token BPE.
    "tiny": ModelConfig(vocab_size=8192, seq_len=256, n_layers=4, hidden=256, n_heads=4),
    "gpt2-small": ModelConfig(vocab_size=50257, seq_len=1024, n_layers=12, hidden=768, n_heads=12),
    "gpt2-medium": ModelConfig(vocab_size=50257, seq_len=1024, n_layers=24, hidden=1024, n_heads=16),
    "gpt2-large": ModelConfig(vocab_size=50257, seq_len=1024, n_layers=36, hidden=1280, n_heads=20),
    "gpt2-xl": ModelConfig(vocab_size=50257, seq_len=1024, n_layers=48, hidden=1600, n_heads=25),
    "gpt3-1.3b": ModelConfig(vocab_size=50257, seq_len=2048, n_layers=24, hidden=2048, n_heads=16),
    # tiny with 8 experts of half the MLP width in every other block, top-2: the active FLOPs per token of tiny.
    "tiny-moe": ModelConfig(vocab_size=8192, seq_len=256, n_layers=4, hidden=256, n_heads=4, moe_experts=8,
                            moe_top_k=2, moe_every=2, moe_ffn_hidden=512),
    # DeepSpeed-MoE's 1.3B+MoE-128 (Rajbhandari et al. 2022): the 1.3B dense model with 128 top-1 experts
    # in every other layer, 52B parameters with the compute of 1.3B.
    "ds-moe-1.3b-128": ModelConfig(vocab_size=50257, seq_len=2048, n_layers=24, hidden=2048, n_heads=16,
                                   moe_experts=128, moe_top_k=1, moe_every=2, moe_capacity_factor=1.0),
    # GPT-3 175B (Brown et al. 2020, table 2.1): the layout planning examples of Narayanan et al. 2021.
    "gpt3-175b": ModelConfig(vocab_size=50257, seq_len=2048, n_layers=96, hidden=12288, n_heads=96),
    "mt-nlg-530b": ModelConfig(
        vocab_size=50257, seq_len=2048, n_layers=105, hidden=20480, n_heads=128, init_std=0.004, activation="gelu"
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset (callers may mutate it)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
