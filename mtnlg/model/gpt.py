"""The GPT: token + position embeddings -> N pre-LN blocks -> final LayerNorm -> tied output layer.

Plain single-device PyTorch, written so parallelism can be applied from outside:
- attention projects q, k, v with one fused Linear whose output rows are grouped per head
  (head 0: q k v, head 1: q k v, ...), so splitting its rows across tensor-parallel ranks
  gives each rank whole heads;
- the local head count is read from tensor shapes (``view(B, T, -1, 3 * head_dim)``),
  never from the config, so a sharded layer runs unchanged;
- nothing here imports ``torch.distributed``.

Shapes: B batch, T new tokens, S cached + new tokens, C hidden, H heads, D head_dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtnlg.config import ModelConfig
from mtnlg.model.kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden, 3 * cfg.hidden)  # rows: per head [q; k; v]
        self.out_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, -1, 3 * self.head_dim)  # (B, T, H, 3D)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # each (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, H, S, D)
        dropout = self.attn_dropout if self.training else 0.0
        # No mask means a fresh sequence (causal) or a single new token that sees every key.
        is_causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(C -> F), GELU, Linear(F -> C)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden, cfg.ffn_size)
        self.fc_out = nn.Linear(cfg.ffn_size, cfg.hidden)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.ln_1 = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), self.layer, kv_cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only Transformer language model (GPT-2 / MT-NLG architecture)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Megatron init: N(0, std) everywhere, std / sqrt(2L) on the residual output projections."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("attn.out_proj", "mlp.fc_out"))
                nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * self.cfg.n_layers) if is_output else std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V_padded) for token ids ``idx`` (B, T), or the mean loss given ``targets``.

        ``targets`` (B, T) holds the next token of each position; -100 is ignored.
        ``kv_cache`` continues a sequence from ``kv_cache.length``. ``attention_mask``
        (B, S) marks real (True) versus padding (False) keys over cached + new tokens, for
        batched prompts of different lengths; ``position_ids`` (B, T) then gives each row's
        own positions.
        """
        h = self.hidden_states(idx, kv_cache, attention_mask, position_ids)
        logits = self.lm_head(h)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def hidden_states(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C): what the output layer turns into logits."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.cfg.seq_len}")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T)
        x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, T, C)
        attn_mask = self._attention_mask(B, T, start, attention_mask, idx.device)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, None, attn_mask, use_reentrant=False)
            else:
                x = block(x, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)

    @staticmethod
    def _attention_mask(
        B: int, T: int, start: int, key_mask: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean (B, 1, T, S) mask (True = attend), or None when SDPA's own causal path fits.

        Query i (absolute position start + i) sees key j when j <= start + i and key j is not
        padding. Each query always sees itself, so padding rows never produce NaNs.
        """
        if key_mask is None and (start == 0 or T == 1):
            return None  # fresh sequence (is_causal) or one new token that sees everything
        S = start + T
        q_pos = torch.arange(start, S, device=device).unsqueeze(1)  # (T, 1)
        k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
        mask = (k_pos <= q_pos).expand(B, T, S)  # (B, T, S)
        if key_mask is not None:
            if key_mask.shape != (B, S):
                raise ValueError(f"attention_mask must have shape {(B, S)}, got {tuple(key_mask.shape)}")
            mask = mask & key_mask.bool().unsqueeze(1)
            mask = mask | (k_pos == q_pos)
        return mask.unsqueeze(1)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied output layer counted once)."""
        return sum(p.numel() for p in self.parameters())
