"""The token inspector: what each layer of the model predicts for a prompt, and where one layer's heads look.

``inspect_prompt`` runs the prompt once and returns, for every block, its "logit lens" (nostalgebraist
2020): the final norm and output layer applied to that block's output, so each layer's top
next-token guesses at every position can be read off, the last layer's being the model's own.
For one chosen layer it also returns each head's attention weights, computed explicitly
(softmax(q k^T / sqrt(D)) with the mask) in place of the fused SDPA kernel that never
materialises them.

Nothing of the model is changed: the model may be decoding other requests in another thread
(``mtnlg serve``'s batcher) while a prompt is inspected, so the run goes through a view of it
(``GPT.view``, the same modules) whose blocks are wrapped to record their outputs, and only the
chosen layer's attention is a shallow copy of the original with an explicit core. The fast
path of everyone else stays SDPA.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtnlg.model.gpt import GPT

MAX_INSPECT_TOKENS = 128  # attention weights are heads x T x T numbers: bounded for the HTTP answer
MAX_INSPECT_TOP = 20


@dataclass
class Inspection:
    """What ``inspect_prompt`` found. L layers, T prompt tokens, k alternatives, H heads."""

    tokens: list[int]  # the prompt (T)
    lens_ids: torch.Tensor  # (L, T, k): layer l's k most likely next tokens after position t
    lens_logprobs: torch.Tensor  # (L, T, k): their log-probabilities under layer l's lens
    attention_layer: int | None = None
    attention: torch.Tensor | None = None  # (H, T, T): head h's weight of key s for query t (rows sum to 1)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, enable_gqa: bool = False, sink: list | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s result (no dropout), with its weights appended to ``sink``:
    (B, H, T, S). Query head h uses key/value head h // (H / G) (SDPA's ``enable_gqa``)."""
    R = q.shape[1] // k.shape[1]
    if R > 1:
        k, v = k.repeat_interleave(R, dim=1), v.repeat_interleave(R, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    T, S = scores.shape[-2:]
    if is_causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = scores.softmax(dim=-1)
    if sink is not None:
        sink.append(weights)
    return (weights @ v.float()).to(v.dtype)


class _Recorded(nn.Module):
    """A block whose output is appended to ``sink`` as it passes."""

    def __init__(self, block: nn.Module, sink: list[torch.Tensor]) -> None:
        super().__init__()
        self.block, self.sink = block, sink

    def forward(self, x: torch.Tensor, *args: object) -> torch.Tensor:
        y = self.block(x, *args)
        self.sink.append(y)
        return y


def _with_explicit_attention(block: nn.Module, sink: list[torch.Tensor]) -> nn.Module:
    """A shallow copy of ``block`` (the same parameters) whose attention records its weights."""
    attn = copy.copy(block.attn)  # its own __dict__: setting ``core`` leaves the original's alone
    attn.core = lambda q, k, v, mask, **kw: explicit_attention(q, k, v, mask, sink=sink, **kw)
    copied = copy.copy(block)
    copied._modules = {**block._modules, "attn": attn}
    return copied


@torch.inference_mode()
def inspect_prompt(
    model: GPT, tokens: Sequence[int], top_k: int = 5, attention_layer: int | None = None,
    vocab_size: int | None = None,
) -> Inspection:
    """Each layer's top-``top_k`` next-token predictions at every position of ``tokens`` (the logit lens)
    and, with ``attention_layer``, that layer's per-head attention weights. Ids >= ``vocab_size``
    (the padding of the output layer) are never predicted."""
    if model.wte is None or model.lm_head is None or model.ln_f is None:
        raise ValueError("the inspector needs the whole model (embeddings, final norm, output layer) in one process")
    n_layers = len(model.blocks)
    if not 1 <= top_k <= MAX_INSPECT_TOP:
        raise ValueError(f"top_k must be in [1, {MAX_INSPECT_TOP}], got {top_k}")
    if attention_layer is not None and not 0 <= attention_layer < n_layers:
        raise ValueError(f"attention_layer must be in [0, {n_layers}) for this {n_layers}-layer model, "
                         f"got {attention_layer}")
    if not 1 <= len(tokens) <= min(MAX_INSPECT_TOKENS, model.cfg.seq_len):
        raise ValueError(f"the prompt has {len(tokens)} tokens; the inspector takes 1 to "
                         f"{min(MAX_INSPECT_TOKENS, model.cfg.seq_len)}")
    outputs: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    view = model.view([int(i) for i in model.blocks], embeddings=True, head=True)
    for i, (name, block) in enumerate(model.blocks.items()):
        chosen = _with_explicit_attention(block, weights) if i == attention_layer else block
        view.blocks[name] = _Recorded(chosen, outputs)
    device = model.wte.weight.device
    view.hidden_states(torch.tensor([list(tokens)], device=device))
    V = vocab_size or model.cfg.vocab_size
    ids, logprobs = [], []
    for h in outputs:  # one layer at a time: (T, V) logits, not (L, T, V)
        logp = model.lm_head(model.ln_f(h))[0, :, :V].float().log_softmax(dim=-1)
        top = logp.topk(min(top_k, V), dim=-1)
        ids.append(top.indices)
        logprobs.append(top.values)
    attention = weights[0][0].cpu() if weights else None
    return Inspection(list(tokens), torch.stack(ids).cpu(), torch.stack(logprobs).cpu(), attention_layer, attention)
