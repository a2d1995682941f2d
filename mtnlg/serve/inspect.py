"""``POST /v1/inspect``: the token inspector over HTTP (``mtnlg.generate.inspect``).

For a prompt it answers each layer's top next-token predictions at every position (the logit
lens) and, for ``attention_layer``, each head's attention weights. The model runs in a worker
thread beside the batcher's decoding (nothing of the model is changed, see the generate module),
so the event loop keeps answering; an inspection is one forward pass over at most
``MAX_INSPECT_TOKENS`` tokens. Numbers are rounded to 4 decimals (the weights of 12 heads over 128
tokens are ~200k numbers).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from pydantic import Field

from mtnlg.generate.engine import Engine
from mtnlg.generate.inspect import MAX_INSPECT_TOKENS, MAX_INSPECT_TOP, Inspection
from mtnlg.serve.handlers import APIError, ServerState
from mtnlg.serve.protocol import Text, TokenId, _Body


class InspectRequest(_Body):
    """The body of ``POST /v1/inspect``."""

    model: Text | None = None
    prompt: Text | Annotated[list[TokenId], Field(min_length=1, max_length=MAX_INSPECT_TOKENS)]
    top_k: int = Field(5, ge=1, le=MAX_INSPECT_TOP, description="alternatives per layer and position")
    attention_layer: int | None = Field(None, ge=0, description="the layer whose per-head attention weights "
                                                                 "are returned (none: no weights)")


def _round(values: list, places: int = 4) -> list:
    return [_round(v, places) if isinstance(v, list) else round(v, places) for v in values]


def render(engine: Engine, found: Inspection) -> dict:
    """The JSON answer: tokens, the lens as ``layers[l].top[t]`` = [{token, id, logprob}, ...], attention."""
    tok = engine.tokenizer

    def text(i: int) -> str:
        return tok.token_str(i) if tok is not None else str(i)

    layers = []
    for layer, (ids, logprobs) in enumerate(zip(found.lens_ids.tolist(), found.lens_logprobs.tolist(), strict=True)):
        top = [[{"token": text(i), "id": i, "logprob": round(lp, 4)} for i, lp in zip(row_ids, row_lp, strict=True)]
               for row_ids, row_lp in zip(ids, logprobs, strict=True)]
        layers.append({"layer": layer, "top": top})
    attention = None
    if found.attention is not None:
        attention = {"layer": found.attention_layer, "heads": found.attention.shape[0],
                     "weights": _round(found.attention.tolist())}
    return {"object": "inspection", "tokens": [text(i) for i in found.tokens], "token_ids": found.tokens,
            "layers": layers, "attention": attention}


async def inspect(server: ServerState, body: InspectRequest) -> dict:
    if body.model and body.model != server.model_name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves "
                            f"'{server.model_name}' (GET /v1/models)", param="model", code="model_not_found")
    n_layers = len(server.engine.model.blocks)
    if body.attention_layer is not None and body.attention_layer >= n_layers:
        raise APIError(400, f"attention_layer must be in [0, {n_layers}) for this {n_layers}-layer model, "
                            f"got {body.attention_layer}", param="attention_layer")
    prompt = body.prompt if isinstance(body.prompt, str) else list(body.prompt)
    try:
        found = await asyncio.to_thread(server.engine.inspect, prompt, body.top_k, body.attention_layer)
    except ValueError as exc:
        raise APIError(400, f"prompt: {exc}", param="prompt") from None
    except NotImplementedError as exc:  # a tensor-parallel server
        raise APIError(501, str(exc), code="not_implemented") from None
    return {"model": server.model_name, **render(server.engine, found)}
