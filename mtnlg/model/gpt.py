"""The GPT: token (+ position) embeddings -> N pre-norm blocks -> final norm -> output layer.

The default is GPT-2 / MT-NLG's block (learned positions, LayerNorm, GELU, biases, tied output);
the Llama / Mistral / Qwen families' variants are switches of the same classes (``model.position``
rope, ``norm`` rmsnorm, ``mlp`` swiglu, ``n_kv_heads``, ``bias``, ``tie_embeddings``, ``qk_norm``).
Plain single-device PyTorch, written so parallelism can be applied from outside:
- attention projects q, k, v with one fused Linear whose output rows are grouped per key/value
  head (group g: its R = H/G query heads, k_g, v_g; plain multi-head: q k v per head), so
  splitting its rows across tensor-parallel ranks gives each rank whole heads;
- the local head count is read from tensor shapes (``view(B, T, -1, (R + 2) * head_dim)``),
  never from the config, so a sharded layer runs unchanged;
- nothing here imports ``torch.distributed``.

Shapes: B batch, T new tokens, S cached + new tokens, C hidden, H heads, G kv heads, D head_dim,
V vocab.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtnlg.config import ModelConfig
from mtnlg.config.families import recompute_mode
from mtnlg.model.kv_cache import KVCache
from mtnlg.model.loss import cross_entropy_loss
from mtnlg.model.moe import MoE, moe_layers
from mtnlg.model.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 whatever the input's dtype (as the Llama/Qwen references do), returned in
    the input's: under bf16 autocast the q/k norms get bf16 heads and keep fp32 gains."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


def norm_layer(cfg: ModelConfig, dim: int) -> nn.Module:
    """LayerNorm (GPT) or RMSNorm (Llama/Qwen) over the last ``dim`` features."""
    return RMSNorm(dim, eps=cfg.layernorm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, eps=cfg.layernorm_eps)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with grouped-query heads (G key/value heads, each shared by R = H / G query
    heads), optional RoPE and QK-norm, and an optional KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.group = cfg.n_heads // cfg.kv_heads  # R query heads per key/value head (1: plain multi-head)
        qkv_rows = (self.group + 2) * cfg.kv_heads * cfg.head_dim
        # rows: per kv head g [q_{gR} .. q_{gR+R-1}; k_g; v_g]: a tensor-parallel row split keeps whole groups
        self.qkv_proj = nn.Linear(cfg.hidden, qkv_rows, bias=cfg.bias or cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden, bias=cfg.bias)
        self.q_norm = norm_layer(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = norm_layer(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.cfg = cfg  # the GPT's own config object: model.recompute is read at each forward
        # SDPA unless context parallelism installs its ring attention (mtnlg.parallel.context), same signature
        self.core: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        R, D = self.group, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, -1, (R + 2) * D)  # (B, T, G, (R+2)D)
        q, k, v = qkv.split([R * D, D, D], dim=-1)
        q = q.reshape(B, T, -1, D)  # (B, T, H, D), head h uses kv head h // R
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # each head normalised over its D dimensions
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, G, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, G, S, D)
        dropout = self.attn_dropout if self.training else 0.0
        # No mask means a fresh sequence (causal) or a single new token that sees every key.
        is_causal = attn_mask is None and T > 1
        gqa = {"enable_gqa": True} if R > 1 else {}  # each kv head serves its group's R query heads
        core = partial(self.core or F.scaled_dot_product_attention, dropout_p=dropout, is_causal=is_causal, **gqa)
        if recompute_mode(self.cfg) == "selective" and self.training and kv_cache is None:
            # Megatron's selective recomputation: keep q, k, v (linear outputs), not the core's s^2 state
            # (softmax, dropout mask; flash's output and log-sum-exp), and run the core again in backward.
            y = checkpoint(core, q, k, v, attn_mask, use_reentrant=False)
        else:
            y = core(q, k, v, attn_mask)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: fc_out(gelu(fc_in x)), or SwiGLU fc_out(silu(fc_gate x) * fc_in x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden, cfg.ffn_size, bias=cfg.bias)  # SwiGLU's "up" projection
        self.fc_gate = nn.Linear(cfg.hidden, cfg.ffn_size, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.fc_out = nn.Linear(cfg.ffn_size, cfg.hidden, bias=cfg.bias)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is not None:
            return self.dropout(self.fc_out(F.silu(self.fc_gate(x)) * self.fc_in(x)))  # (B, T, F) -> (B, T, C)
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.ln_1 = norm_layer(cfg, cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = norm_layer(cfg, cfg.hidden)
        moe = cfg.is_moe_layer(layer)
        self.mlp: MLP | MoE = MoE(cfg, MLP(cfg) if cfg.moe_shared_expert else None) if moe else MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), self.layer, kv_cache, attn_mask, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only Transformer language model (GPT-2 / MT-NLG architecture).

    A pipeline stage is this same class with some parts deleted (``mtnlg.parallel.pipeline``):
    the forward runs whatever the instance holds. Token and position embeddings (``wte``,
    ``wpe``) only on the first stage, whose input is token ids; the final LayerNorm and output
    layer only on the last, whose output is logits; stages in between map hidden states to hidden
    states. ``blocks`` is keyed by layer number, so a stage's parameters keep the names they
    have in the whole model (``blocks.7.attn.qkv_proj.weight``) and checkpoints stay layout-free.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte: nn.Embedding | None = nn.Embedding(cfg.padded_vocab_size, cfg.hidden)
        self.wpe: nn.Embedding | None = nn.Embedding(cfg.seq_len, cfg.hidden) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.ln_f: nn.Module | None = norm_layer(cfg, cfg.hidden)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden, cfg.padded_vocab_size, bias=False)
        # Packed documents' attention mask from their ids; context parallelism (mtnlg.parallel.context), whose
        # ring attention builds each key block's mask itself, makes it pass the ids through instead.
        self.document_mask: Callable[[torch.Tensor], torch.Tensor] = document_mask
        self.tie_weights()
        if not self.lm_head.weight.is_meta:  # a model built on the meta device is initialised by materialize()
            self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the output layer's weight with the token embedding (when both are held here)."""
        if self.cfg.tie_embeddings and self.wte is not None and self.lm_head is not None:
            self.lm_head.weight = self.wte.weight

    def reset_parameters(self, seed: int | None = None) -> None:
        """Megatron init: N(0, std) everywhere, std / sqrt(2L) on the residual output projections.

        Every weight draws from a generator of its own, seeded by ``seed`` and the weight's name,
        so its values do not depend on which other parts this instance holds: a pipeline stage
        initialised alone equals the same layers of the whole model. A tied output layer held
        without the embedding (the last pipeline stage) draws under the embedding's name, so both
        copies start equal. ``seed`` None takes one from torch's global generator.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu"))
        std, n_layers = self.cfg.init_std, self.cfg.n_layers
        out_std = std / math.sqrt(2 * n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                key = "wte" if name == "lm_head" and self.cfg.tie_embeddings else name
                is_output = name.endswith(("attn.out_proj", "fc_out"))  # a shared expert's too
                generator = _generator(seed, key, module.weight.device)
                nn.init.normal_(module.weight, 0.0, out_std if is_output else std, generator)
            if isinstance(module, MoE):
                device = module.router.gate.weight.device
                module.reset_parameters(lambda key, n=name, d=device: _generator(seed, f"{n}.{key}", d), std, out_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def materialize(self, device: torch.device | str, seed: int) -> GPT:
        """Allocate a model built on the meta device on ``device`` and initialise it from ``seed``.

        Only the parts this instance still holds are allocated: building on ``meta``, deleting
        what a process does not own, then materialising never holds the whole model in memory.
        """
        self.to_empty(device=device)
        self.tie_weights()  # to_empty gives each holder of a shared weight its own tensor
        self.reset_parameters(seed)
        return self

    def keep_only(self, layers: Iterable[int], *, embeddings: bool, head: bool) -> GPT:
        """Delete, in place, every part but these layers (and the embeddings / output end); returns self.

        What a pipeline rank keeps of a model built on the meta device, before materialising it.
        """
        keep = {str(i) for i in layers}
        for name in [name for name in self.blocks if name not in keep]:
            del self.blocks[name]
        if not embeddings:
            self.wte = self.wpe = None
        if not head:
            self.ln_f = self.lm_head = None
        return self

    def view(self, layers: Iterable[int], *, embeddings: bool, head: bool) -> GPT:
        """A GPT holding these parts of this one: the same module objects, nothing copied.

        A pipeline stage is such a view of its rank's model, so the two share parameters.
        """
        view = GPT.__new__(GPT)
        nn.Module.__init__(view)
        view.cfg, view.document_mask = self.cfg, self.document_mask
        view.wte, view.wpe = (self.wte, self.wpe) if embeddings else (None, None)
        view.drop = self.drop
        view.blocks = nn.ModuleDict({str(i): self.blocks[str(i)] for i in layers})
        view.ln_f, view.lm_head = (self.ln_f, self.lm_head) if head else (None, None)
        return view.train(self.training)

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V_padded) for token ids ``x`` (B, T), or the mean loss given ``targets``.

        ``targets`` (B, T) holds the next token of each position; -100 is ignored. In training, the
        gradient of the loss also carries the MoE layers' weighted auxiliary losses (``aux_loss``).
        ``kv_cache`` continues a sequence from ``kv_cache.length``. ``attention_mask``
        (B, S) marks real (True) versus padding (False) keys over cached + new tokens, for
        batched prompts of different lengths; ``position_ids`` (B, T) then gives each row's
        own positions. ``document_ids`` (B, T) numbers the documents packed into each row (runs
        of equal ids): a token attends only to earlier tokens of its own document and positions
        restart at each one, so every document is computed as if it ran alone (fine-tuning's
        packed samples); given with ``position_ids``, the rows are a shard of longer sequences whose
        document positions the caller computed (context parallelism). A stage without the output
        layer returns hidden states (B, T, C).
        """
        h = self.hidden_states(x, kv_cache, attention_mask, position_ids, document_ids)
        if self.lm_head is None:
            return h
        logits = self.lm_head(h)  # (B, T, V)
        if targets is None:
            return logits
        loss, aux = cross_entropy_loss(logits, targets), self.aux_loss()
        # MoE: the value stays the language-model loss (comparable with a dense model's, and the same under a
        # pipeline, where the auxiliary losses of other stages cannot be added); the gradient includes them.
        return loss if aux is None else loss + (aux - aux.detach())

    def aux_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary losses (load balancing, router z-loss) that this instance's MoE layers
        computed in the forward just run; None for a dense model or in eval mode."""
        losses = [aux for _, moe in moe_layers(self.blocks) if (aux := moe.take_aux_loss()) is not None]
        return torch.stack(losses).sum() if losses else None

    def hidden_states(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C): what the output layer turns into logits.

        On a stage without the embeddings ``x`` is already hidden states (B, T, C); on one
        without the final LayerNorm the last block's output is returned.
        """
        B, T = x.shape[:2]
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.cfg.seq_len}")
        if document_ids is not None:
            if kv_cache is not None or attention_mask is not None:
                raise ValueError("document_ids replace kv_cache and attention_mask: give it alone (with position_ids "
                                 "only for a shard of a longer sequence)")
            if position_ids is None:
                position_ids = document_positions(document_ids)
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=x.device).unsqueeze(0)  # (1, T)
        if self.wte is not None:
            x = self.wte(x)  # (B, T, C)
            x = self.drop(x + self.wpe(position_ids) if self.wpe is not None else x)
        rope = rope_cos_sin(self.cfg, position_ids, x.dtype) if self.cfg.position == "rope" else None
        if document_ids is not None:
            attn_mask = self.document_mask(document_ids)
        else:
            attn_mask = self._attention_mask(B, T, start, attention_mask, x.device)
        for block in self.blocks.values():
            if recompute_mode(self.cfg) == "full" and self.training and kv_cache is None:
                x = checkpoint(block, x, None, attn_mask, rope, use_reentrant=False)
            else:
                x = block(x, kv_cache, attn_mask, rope)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x) if self.ln_f is not None else x

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


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) counting from 0 at the first token of each run of equal document ids."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)  # (B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # index of the current document's first token
    return index - first


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) block-diagonal causal mask: query i sees key j <= i of the same document."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()  # (T, T)
    same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # (B, T, T)
    return (same & causal).unsqueeze(1)


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator on ``device`` whose stream depends only on the run's seed and a parameter's name."""
    return torch.Generator(device=device).manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
