"""Hugging Face <-> mtnlg: one table of names per family, read in both directions.

Families: GPT-2 (``GPT2LMHeadModel``) and the Llama family, whose four architectures share one
table (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``
differ only in their config: biases on q/k/v for Qwen 2, QK-norm for Qwen 3). A table row is
(HF name, mtnlg name, kind); several HF tensors may form one mtnlg tensor. Kinds:
- ``same``: identical; ``vocab``: mtnlg may pad the vocabulary rows, export drops the padding;
- ``conv1d``: HF GPT-2's Conv1D stores (in, out), ``nn.Linear`` (out, in): transpose;
- ``qkv`` / ``qkv_conv1d``: GPT-2's fused ``c_attn`` is [all q | all k | all v]; mtnlg groups rows
  per head ([q_h; k_h; v_h]) so tensor parallelism splits whole heads: permute;
- ``q``, ``k``, ``v``: the Llama family's separate projections, fused into mtnlg's ``qkv_proj``
  grouped per key/value head g: [q of its R = H/G query heads; k_g; v_g] (``fuse_qkv``).
RoPE needs no permutation: mtnlg rotates in HF's "half" layout (``mtnlg.model.rope``).

Pure tensor and dict work, one tensor at a time (it runs on meta tensors too, which is how the
converter finds the shapes to expect); reading and writing directories is ``mtnlg.checkpoint.convert``'s.
"""

from __future__ import annotations

from typing import Any

import torch

from mtnlg.config.sections import ConfigError, ModelConfig

# (HF name, mtnlg name, kind) of GPT-2's tensors outside the blocks (under "transformer.") ...
GPT2_GLOBAL = (
    ("transformer.wte.weight", "wte.weight", "vocab"),
    ("transformer.wpe.weight", "wpe.weight", "same"),
    ("transformer.ln_f.weight", "ln_f.weight", "same"),
    ("transformer.ln_f.bias", "ln_f.bias", "same"),
)
# ... and of block i, under "transformer.h.{i}." (HF) and "blocks.{i}." (mtnlg).
GPT2_BLOCK = (
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
# The Llama family (Llama, Mistral, Qwen 2, Qwen 3): outside the blocks ...
LLAMA_GLOBAL = (
    ("model.embed_tokens.weight", "wte.weight", "vocab"),
    ("model.norm.weight", "ln_f.weight", "same"),
)
# ... and block i, under "model.layers.{i}." (rows whose mtnlg tensor a config lacks are skipped).
LLAMA_BLOCK = (
    ("input_layernorm.weight", "ln_1.weight", "same"),
    ("post_attention_layernorm.weight", "ln_2.weight", "same"),
    ("self_attn.q_proj.weight", "attn.qkv_proj.weight", "q"),
    ("self_attn.k_proj.weight", "attn.qkv_proj.weight", "k"),
    ("self_attn.v_proj.weight", "attn.qkv_proj.weight", "v"),
    ("self_attn.q_proj.bias", "attn.qkv_proj.bias", "q"),
    ("self_attn.k_proj.bias", "attn.qkv_proj.bias", "k"),
    ("self_attn.v_proj.bias", "attn.qkv_proj.bias", "v"),
    ("self_attn.o_proj.weight", "attn.out_proj.weight", "same"),
    ("self_attn.q_norm.weight", "attn.q_norm.weight", "same"),
    ("self_attn.k_norm.weight", "attn.k_norm.weight", "same"),
    ("mlp.gate_proj.weight", "mlp.fc_gate.weight", "same"),
    ("mlp.up_proj.weight", "mlp.fc_in.weight", "same"),
    ("mlp.down_proj.weight", "mlp.fc_out.weight", "same"),
)
TABLES = {"gpt2": (GPT2_GLOBAL, GPT2_BLOCK, "transformer.h"), "llama": (LLAMA_GLOBAL, LLAMA_BLOCK, "model.layers")}
# HF model_type -> (table, architecture class written on export)
FAMILIES = {
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("llama", "MistralForCausalLM"),
    "qwen2": ("llama", "Qwen2ForCausalLM"),
    "qwen3": ("llama", "Qwen3ForCausalLM"),
}
# HF activation_function -> model.activation (the first of each is what an export writes).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Tensors some HF files carry that are not weights (RoPE tables of older Llama exports).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")

Plan = list[tuple[str, tuple[str, ...], str]]  # (mtnlg name, its HF names, kind)


def plan(cfg: ModelConfig, model_type: str, ours: set[str]) -> Plan:
    """Every mtnlg tensor of a model (``ours``: its state-dict names) with the HF tensors that make it."""
    glob, block, prefix = TABLES[FAMILIES[model_type][0]]
    rows = list(glob)
    for i in range(cfg.n_layers):
        rows += [(f"{prefix}.{i}.{hf}", f"blocks.{i}.{name}", kind) for hf, name, kind in block]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight", "vocab"))
    grouped: dict[str, tuple[list[str], str]] = {}
    for hf, name, kind in rows:
        if name in ours:
            grouped.setdefault(name, ([], kind))[0].append(hf)
    return [(name, tuple(hfs), "gqa" if kind == "q" else kind) for name, (hfs, kind) in grouped.items()]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q (H D, ...), k and v (G D, ...) -> rows [q of group g (R D); k_g (D); v_g (D)] for each g."""
    parts = [t.reshape(kv_heads, -1, *t.shape[1:]) for t in (q, k, v)]  # (G, R D | D | D, ...)
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """``fuse_qkv``'s inverse: the fused rows back to q (H D, ...), k, v (G D, ...)."""
    G, D, R = cfg.kv_heads, cfg.head_dim, cfg.n_heads // cfg.kv_heads
    q, k, v = qkv.reshape(G, (R + 2) * D, *qkv.shape[1:]).split([R * D, D, D], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))


def _gpt2_qkv(w: torch.Tensor, n_heads: int, to_mtnlg: bool) -> torch.Tensor:
    """Rows [q | k | v] <-> rows [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]."""
    shape = (3, n_heads) if to_mtnlg else (n_heads, 3)
    return w.reshape(*shape, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def to_mtnlg(kind: str, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The mtnlg tensor made of these HF tensors (in the plan's order)."""
    t = tensors[0]
    if kind == "conv1d":
        return t.t()
    if kind in ("qkv", "qkv_conv1d"):
        return _gpt2_qkv(t.t() if kind == "qkv_conv1d" else t, cfg.n_heads, to_mtnlg=True)
    if kind == "gqa":
        return fuse_qkv(*tensors, kv_heads=cfg.kv_heads)
    return t


def to_hf(kind: str, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The HF tensors (in the plan's order) an mtnlg tensor becomes."""
    if kind == "conv1d":
        return [t.t()]
    if kind in ("qkv", "qkv_conv1d"):
        t = _gpt2_qkv(t, cfg.n_heads, to_mtnlg=False)
        return [t.t() if kind == "qkv_conv1d" else t]
    if kind == "gqa":
        return list(split_qkv(t, cfg))
    if kind == "vocab":
        return [t[: cfg.vocab_size]]  # the padding rows dropped
    return [t]


def export_family(m: ModelConfig) -> str:
    """The HF model_type an mtnlg model is written as, or a ConfigError naming what no family has."""
    if m.moe_experts:
        raise ConfigError("a mixture-of-experts model (model.moe_experts) has no HF family here")
    gpt2 = (m.position, m.norm, m.mlp, m.bias, m.kv_heads, m.head_size, m.qk_norm) == (
        "learned", "layernorm", "gelu", True, m.n_heads, 0, False)
    if gpt2:
        return "gpt2"
    if (m.position, m.norm, m.mlp, m.bias) != ("rope", "rmsnorm", "swiglu", False):
        raise ConfigError("HF export needs a GPT-2 block (learned, layernorm, gelu, bias) or a Llama-family one "
                          f"(rope, rmsnorm, swiglu, no bias); got model.position={m.position} norm={m.norm} "
                          f"mlp={m.mlp} bias={m.bias}")
    if m.qk_norm and m.qkv_bias:
        raise ConfigError("model.qk_norm with model.qkv_bias matches no HF family (Qwen 3 has no q/k/v biases)")
    return "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias else "llama"


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's rope fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"position": "rope", "rope_theta": float(theta)}
    if kind in (None, "default"):
        return out
    if kind not in ("linear", "llama3", "yarn"):
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3, yarn)")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if params.get(key) is not None:
            raise ValueError(f"rope scaling {kind} with {key} is not supported")
    if params.get("truncate", True) is not True:
        raise ValueError("yarn rope scaling with truncate=false is not supported")
    out |= {"rope_scaling": kind, "rope_factor": float(params.get("factor", 1.0)),
            "rope_original_len": int(params.get("original_max_position_embeddings") or 0)}
    if kind == "llama3":
        out |= {"rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"])}
    if kind == "yarn":
        out |= {"rope_beta_fast": float(params.get("beta_fast") or 32), "rope_beta_slow": float(
            params.get("beta_slow") or 1)}
    return out


def _llama_config_from_hf(hf: dict[str, Any], model_type: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only silu, i.e. SwiGLU)")
    if hf.get("mlp_bias") or (model_type != "qwen2" and hf.get("attention_bias")):
        raise ValueError("attention_bias / mlp_bias are not supported for this family (mtnlg: model.bias)")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window is set: sliding-window attention is not implemented")
    n_heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // n_heads
    seq_len = hf["max_position_embeddings"]
    if model_type == "mistral" and hf.get("sliding_window"):
        seq_len = min(seq_len, hf["sliding_window"])  # within its window, sliding attention is full attention
    return ModelConfig(
        vocab_size=hf["vocab_size"], seq_len=seq_len, n_layers=hf["num_hidden_layers"], hidden=hidden,
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_size=0 if head_dim * n_heads == hidden else head_dim, ffn_hidden=hf["intermediate_size"],
        dropout=0.0, layernorm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=hf.get("tie_word_embeddings", False), padded_vocab_multiple=1, norm="rmsnorm",
        mlp="swiglu", bias=False, qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        **_rope_from_hf(hf),
    )


def _gpt2_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation_function {act!r}; supported: {', '.join(ACTIVATIONS)}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"HF config sets {flag}, which mtnlg's attention does not implement")
    if hf.get("scale_attn_weights") is False:
        raise ValueError("HF config disables scale_attn_weights; mtnlg always scales by 1/sqrt(head_dim)")
    return ModelConfig(
        vocab_size=hf["vocab_size"], seq_len=hf["n_positions"], n_layers=hf["n_layer"], hidden=hf["n_embd"],
        n_heads=hf["n_head"], ffn_hidden=hf.get("n_inner") or 0, dropout=0.0,
        layernorm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=hf.get("tie_word_embeddings", True), padded_vocab_multiple=1, activation=ACTIVATIONS[act],
    )


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map an HF ``config.json`` dict onto ModelConfig (no vocabulary padding, for exact parity).

    A missing key raises KeyError (the caller names the file); an unsupported setting ValueError."""
    model_type = hf.get("model_type", "gpt2")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return _gpt2_config_from_hf(hf) if model_type == "gpt2" else _llama_config_from_hf(hf, model_type)


def _rope_to_hf(m: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling,
                              "rope_theta": m.rope_theta}
    if m.rope_scaling != "none":
        params["factor"] = m.rope_factor
    if m.rope_scaling in ("llama3", "yarn"):
        params["original_max_position_embeddings"] = m.rope_original_len
    if m.rope_scaling == "llama3":
        params |= {"low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor}
    if m.rope_scaling == "yarn":
        params |= {"beta_fast": m.rope_beta_fast, "beta_slow": m.rope_beta_slow}
    # transformers 5 reads rope_parameters; older readers (vLLM, transformers 4) rope_theta + rope_scaling
    scaling = None if m.rope_scaling == "none" else {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_parameters": params, "rope_theta": m.rope_theta, "rope_scaling": scaling}


def hf_config(m: ModelConfig, eos_id: int, model_type: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of an exported directory: ``model_config_from_hf``'s inverse."""
    model_type = model_type or export_family(m)
    common = {"model_type": model_type, "architectures": [FAMILIES[model_type][1]], "vocab_size": m.vocab_size,
              "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings,
              "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}
    if model_type == "gpt2":
        activation = next(hf for hf, ours in ACTIVATIONS.items() if ours == m.activation)
        return common | {
            "n_positions": m.seq_len, "n_embd": m.hidden, "n_layer": m.n_layers, "n_head": m.n_heads,
            "n_inner": m.ffn_hidden or None, "activation_function": activation, "layer_norm_epsilon": m.layernorm_eps,
            "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
        }
    return common | {
        "hidden_size": m.hidden, "intermediate_size": m.ffn_size, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
        "max_position_embeddings": m.seq_len, "rms_norm_eps": m.layernorm_eps, "hidden_act": "silu",
        "attention_bias": model_type == "qwen2", "attention_dropout": m.dropout,
        **({"sliding_window": None} if model_type == "mistral" else {}),
        **({"use_sliding_window": False} if model_type.startswith("qwen") else {}),
        **_rope_to_hf(m),
    }

