"""Checkpoints to and from Hugging Face GPT-2 directories (the name table is ``mtnlg.model.hf``'s),
and a dense checkpoint turned into a mixture-of-experts one (``upcycle``).

Every output directory is written atomically: a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtnlg.checkpoint.model import load_model, save_model
from mtnlg.checkpoint.output import HF, MODEL, check_output
from mtnlg.config import Config, ConfigError, apply_settings
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT
from mtnlg.model.hf import hf_config, hf_state_to_mtnlg, model_config_from_hf, mtnlg_state_to_hf
from mtnlg.util.fs import atomic_dir, read_json, write_json


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    if (hf_dir / "model.safetensors").is_file():
        state = load_file(str(hf_dir / "model.safetensors"))
    elif (hf_dir / "pytorch_model.bin").is_file():
        state = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")
    return state


def load_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer:
    """A tokenizer for a model with ``vocab_size`` token ids: each id it produces needs an embedding row."""
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"only {vocab_size}: it is another model's tokenizer")
    return tokenizer


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()


def from_hf(
    hf_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Import a local HF GPT-2 directory into an mtnlg checkpoint directory, with the tokenizer of
    ``tokenizer_dir`` or else HF_DIR's own (none when neither is given: see ``mtnlg generate --tokenizer``)."""
    check_output(out_dir, MODEL, [hf_dir, tokenizer_dir], overwrite)
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (expected a Hugging Face GPT-2 directory)")
    hf_cfg = read_json(cfg_path)
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


def to_hf(
    ckpt: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Export an mtnlg checkpoint as an HF directory that ``GPT2LMHeadModel.from_pretrained`` loads,
    with its tokenizer (that of ``tokenizer_dir`` when given)."""
    check_output(out_dir, HF, [ckpt, tokenizer_dir], overwrite)
    model, cfg, tokenizer = load_model(ckpt)
    if cfg.model.moe_experts:
        raise ValueError(f"{ckpt} is a mixture-of-experts model, which GPT-2 directories cannot hold")
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir, cfg.model.vocab_size)
    hf = mtnlg_state_to_hf(model.state_dict(), cfg.model)
    eos = tokenizer.eod_id if tokenizer is not None else cfg.model.vocab_size - 1

    def fill(tmp: Path) -> None:
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config(cfg.model, eos), indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
            tokenizer.save_gpt2_files(tmp)

    return atomic_dir(out_dir, fill)


def upcycle(
    ckpt: str | Path, out_dir: str | Path, experts: int, overrides: list[str] | None = None, overwrite: bool = False
) -> Path:
    """Sparse upcycling (Komatsuzaki et al. 2023): a MoE checkpoint from a dense one, every expert of a MoE
    block a copy of that block's dense MLP, the router freshly initialised (from ``train.seed``).

    ``overrides`` set the other ``model.moe_*`` fields (``--model.moe_top_k=1``, ...). With gates that sum
    to 1 (top-k > 1, or sigmoid scores) and dropless routing, the first forward equals the dense model's.
    """
    check_output(out_dir, MODEL, [ckpt], overwrite)
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
