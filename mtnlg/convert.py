"""Hugging Face GPT-2 <-> mtnlg weights.

Differences handled here, and only here:
- HF's ``Conv1D`` stores weights as (in, out); ``nn.Linear`` stores (out, in): transpose.
- HF's fused ``c_attn`` output is [all q | all k | all v]; mtnlg groups rows per head
  ([q_h; k_h; v_h] for each head h) so tensor parallelism can split whole heads: permute.
- mtnlg may pad the vocabulary; export drops the padding rows.

It also turns a dense mtnlg checkpoint into a mixture-of-experts one (``upcycle``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtnlg.checkpoint import load_model, save_model
from mtnlg.config import Config, ConfigError, ModelConfig, apply_settings
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT

# HF Conv1D name -> mtnlg nn.Linear name, within a block (weights transposed between them).
_LINEARS = (("attn.c_proj", "attn.out_proj"), ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out"))
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _hf_qkv_to_per_head(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(3C, ...) rows [q | k | v] -> rows [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]."""
    rest = w.shape[1:]
    return w.reshape(3, n_heads, -1, *rest).transpose(0, 1).reshape(w.shape)


def _per_head_to_hf_qkv(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rest = w.shape[1:]
    return w.reshape(n_heads, 3, -1, *rest).transpose(0, 1).reshape(w.shape)


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Map an HF ``GPT2Config`` dict onto ModelConfig (no vocabulary padding, for exact parity)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation_function {act!r}; supported: {', '.join(_ACTIVATIONS)}")
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
        activation=_ACTIVATIONS[act],
    )


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    if (hf_dir / "model.safetensors").is_file():
        state = load_file(str(hf_dir / "model.safetensors"))
    elif (hf_dir / "pytorch_model.bin").is_file():
        state = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")
    # GPT2LMHeadModel prefixes 'transformer.'; a bare GPT2Model does not.
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def hf_state_to_mtnlg(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename, transpose and permute an HF GPT-2 state dict into mtnlg's layout."""
    H = cfg.n_heads
    out = {
        "wte.weight": hf_state["wte.weight"],
        "wpe.weight": hf_state["wpe.weight"],
        "ln_f.weight": hf_state["ln_f.weight"],
        "ln_f.bias": hf_state["ln_f.bias"],
    }
    for i in range(cfg.n_layers):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for name in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                out[f"{dst}{name}.{p}"] = hf_state[f"{src}{name}.{p}"]
        out[f"{dst}attn.qkv_proj.weight"] = _hf_qkv_to_per_head(hf_state[f"{src}attn.c_attn.weight"].t(), H)
        out[f"{dst}attn.qkv_proj.bias"] = _hf_qkv_to_per_head(hf_state[f"{src}attn.c_attn.bias"], H)
        for hf_name, ours in _LINEARS:
            out[f"{dst}{ours}.weight"] = hf_state[f"{src}{hf_name}.weight"].t()
            out[f"{dst}{ours}.bias"] = hf_state[f"{src}{hf_name}.bias"]
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    else:
        out["lm_head.weight"] = hf_state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def load_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer:
    """A tokenizer for a model with ``vocab_size`` token ids: each id it produces needs an embedding row."""
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"only {vocab_size}: it is another model's tokenizer")
    return tokenizer


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()


def from_hf(hf_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Import a local HF GPT-2 directory into an mtnlg checkpoint directory, with the tokenizer of
    ``tokenizer_dir`` or else HF_DIR's own (none when neither is given: see ``mtnlg generate --tokenizer``)."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (expected a Hugging Face GPT-2 directory)")
    hf_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if hf_cfg.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{cfg_path}: model_type {hf_cfg.get('model_type')!r} is not gpt2")
    cfg = Config(model=model_config_from_hf(hf_cfg)).validate()
    state = hf_state_to_mtnlg(_read_hf_weights(hf_dir), cfg.model)
    with torch.device("meta"):
        model = GPT(cfg.model)
    model.load_state_dict(state, assign=True)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    source = tokenizer_dir if tokenizer_dir is not None else (hf_dir if _has_tokenizer(hf_dir) else None)
    tokenizer = load_tokenizer(source, cfg.model.vocab_size) if source is not None else None
    return save_model(out_dir, model.float(), cfg, tokenizer)


def to_hf(ckpt: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Export an mtnlg checkpoint as an HF directory that ``GPT2LMHeadModel.from_pretrained`` loads,
    with its tokenizer (that of ``tokenizer_dir`` when given)."""
    model, cfg, tokenizer = load_model(ckpt)
    if cfg.model.moe_experts:
        raise ValueError(f"{ckpt} is a mixture-of-experts model, which GPT-2 directories cannot hold")
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir, cfg.model.vocab_size)
    m = cfg.model
    state = model.state_dict()
    V, H = m.vocab_size, m.n_heads
    hf: dict[str, torch.Tensor] = {
        "transformer.wte.weight": state["wte.weight"][:V],
        "transformer.wpe.weight": state["wpe.weight"],
        "transformer.ln_f.weight": state["ln_f.weight"],
        "transformer.ln_f.bias": state["ln_f.bias"],
    }
    for i in range(m.n_layers):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for name in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                hf[f"{dst}{name}.{p}"] = state[f"{src}{name}.{p}"]
        hf[f"{dst}attn.c_attn.weight"] = _per_head_to_hf_qkv(state[f"{src}attn.qkv_proj.weight"], H).t()
        hf[f"{dst}attn.c_attn.bias"] = _per_head_to_hf_qkv(state[f"{src}attn.qkv_proj.bias"], H)
        for hf_name, ours in _LINEARS:
            hf[f"{dst}{hf_name}.weight"] = state[f"{src}{ours}.weight"].t()
            hf[f"{dst}{hf_name}.bias"] = state[f"{src}{ours}.bias"]
    if not m.tie_embeddings:
        hf["lm_head.weight"] = state["lm_head.weight"][:V]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    eos = tokenizer.eod_id if tokenizer is not None else V - 1
    hf_config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": V,
        "n_positions": m.seq_len,
        "n_embd": m.hidden,
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_inner": m.ffn_hidden or None,
        "activation_function": "gelu_new" if m.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": m.layernorm_eps,
        "initializer_range": m.init_std,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(out_dir)
        tokenizer.save_gpt2_files(out_dir)
    return out_dir


def upcycle(ckpt: str | Path, out_dir: str | Path, experts: int, overrides: list[str] | None = None) -> Path:
    """Sparse upcycling (Komatsuzaki et al. 2023): a MoE checkpoint from a dense one, every expert of a MoE
    block a copy of that block's dense MLP, the router freshly initialised (from ``train.seed``).

    ``overrides`` set the other ``model.moe_*`` fields (``--model.moe_top_k=1``, ...). With gates that sum
    to 1 (top-k > 1, or sigmoid scores) and dropless routing, the first forward equals the dense model's.
    """
    dense, cfg, tokenizer = load_model(ckpt)
    if cfg.model.moe_experts:
        raise ConfigError(f"{ckpt} is already a mixture-of-experts model (model.moe_experts={cfg.model.moe_experts})")
    bad = [o for o in overrides or [] if not o.startswith("--model.moe_")]
    if bad:
        raise ConfigError(f"upcycling takes only --model.moe_* settings, got {bad}")
    new = apply_settings(copy.deepcopy(cfg), overrides=[f"--model.moe_experts={experts}", *(overrides or [])])
    m = new.validate().model
    if m.expert_ffn_size != m.ffn_size or m.moe_shared_expert:
        raise ConfigError("upcycled experts are copies of the dense MLP: leave model.moe_ffn_hidden at 0 and "
                          "model.moe_shared_expert off")
    with torch.device("meta"):
        model = GPT(m)
    model.materialize("cpu", new.train.seed)
    state, dense_state = model.state_dict(), dense.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name in dense_state:
                tensor.copy_(dense_state[name])
        for i in range(m.n_layers):
            if m.is_moe_layer(i):
                mlp, grouped = dense.blocks[str(i)].mlp, model.blocks[str(i)].mlp.experts
                for part in ("fc_in", "fc_out"):
                    layer = getattr(mlp, part)
                    getattr(grouped, f"{part}_weight").copy_(layer.weight.expand(experts, -1, -1))
                    getattr(grouped, f"{part}_bias").copy_(layer.bias.expand(experts, -1))
    return save_model(out_dir, model, new, tokenizer)
