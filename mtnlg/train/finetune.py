"""Supervised fine-tuning's model side: the checkpoint to start from, its tokenizer given the chat
markers and its vocabulary grown to hold them. The instruction data is ``mtnlg.data.sft``'s; the
loop is the one trainer's.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from mtnlg.checkpoint.convert import load_tokenizer
from mtnlg.checkpoint.model import load_model
from mtnlg.config import Config, ConfigError, ModelConfig, runtime_fields
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.gpt import GPT

# -- the model and tokenizer to start from ---------------------------------------------------------


def add_chat_tokens(tokenizer: Tokenizer) -> range:
    """Attach the tokenizer's chat template (its own or the default) and return the ids that added."""
    before = tokenizer.vocab_size
    ChatTemplate.of(tokenizer).attach(tokenizer)
    return range(before, tokenizer.vocab_size)


def grow_vocabulary(model: GPT, cfg: ModelConfig, new_ids: range) -> GPT:
    """``model``'s weights in a GPT of config ``cfg``, whose vocabulary may be larger.

    Rows of existing ids are kept as they are; rows of ``new_ids`` (and any new padding rows) start
    at the mean of the existing ids' rows, so a new token begins with an average logit instead of a
    random one that could dominate the softmax (Hewitt, "Initializing new word embeddings", 2021).
    """
    state = dict(model.state_dict())
    names = ["wte.weight"] if cfg.tie_embeddings else ["wte.weight", "lm_head.weight"]
    for name in names:
        old = state[name]
        mean = old[: new_ids.start].mean(dim=0)
        grown = mean.expand(cfg.padded_vocab_size, old.shape[1]).clone()
        grown[: min(len(old), len(grown))] = old[: len(grown)]
        grown[new_ids.start : new_ids.stop] = mean
        state[name] = grown
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    with torch.device("meta"):
        grown_model = GPT(cfg)
    grown_model.load_state_dict(state, assign=True, strict=True)
    grown_model.tie_weights()
    return grown_model.train()


# What a fine-tuning run may set differently from its checkpoint: the runtime fields, and the vocabulary
# (grown for the chat markers).
_FREE_FIELDS = runtime_fields(ModelConfig) | {"vocab_size"}


def load_base_model(cfg: Config) -> tuple[GPT, Tokenizer]:
    """The model ``finetune.checkpoint`` holds, grown for the chat markers, and its tokenizer (or
    ``data.tokenizer``) with the chat template attached; sets ``cfg.model.vocab_size`` to match."""
    if not cfg.finetune.checkpoint:
        raise ConfigError("finetune needs a model to start from: --checkpoint DIR (finetune.checkpoint)")
    model, saved, tokenizer = load_model(cfg.finetune.checkpoint)
    if cfg.data.tokenizer:
        tokenizer = load_tokenizer(cfg.data.tokenizer, saved.model.vocab_size)
    if tokenizer is None:
        raise ConfigError(f"{cfg.finetune.checkpoint} has no tokenizer: give --tokenizer DIR")
    changed = [f"model.{f.name}={getattr(saved.model, f.name)!r}" for f in fields(ModelConfig)
               if f.name not in _FREE_FIELDS and getattr(saved.model, f.name) != getattr(cfg.model, f.name)]
    if changed:
        raise ConfigError(f"the model's shape comes from {cfg.finetune.checkpoint}; it has {', '.join(changed)}")
    new_ids = add_chat_tokens(tokenizer)
    cfg.model.vocab_size = max(saved.model.vocab_size, tokenizer.vocab_size)
    return grow_vocabulary(model, cfg.model, new_ids), tokenizer
