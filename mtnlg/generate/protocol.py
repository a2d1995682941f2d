"""Request bodies of the HTTP API: OpenAI's completions and Megatron-LM's ``PUT /api``.

Strict JSON: wrong types and unknown fields are errors (400, naming the field), not silently
coerced or ignored. Every field is range-checked here, at the edge, so that nothing a client can
send makes the batch worker fail: numbers must be finite (JSON's non-standard ``NaN`` and
``Infinity`` are refused) and within the ranges of ``SamplingParams.LIMITS`` (OpenAI's documented
ones where it has them), strings must be valid Unicode (a lone UTF-16 surrogate, which JSON's
``\\ud800`` escape can carry, is refused), and lists are bounded. Known OpenAI options this server
does not implement are refused by name, each with its own reason (``unsupported``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from mtnlg.generate.sequence import LIMITS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS

MAX_PROMPTS = 64  # strings or token lists in one request
MAX_PROMPT_IDS = 1 << 20  # token ids in one prompt (the context length decides much earlier)


def _valid_unicode(text: str) -> str:
    """Refuse lone surrogates: they are not text, and neither the tokenizer nor UTF-8 can hold them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains an unpaired UTF-16 surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]


def _limit(name: str, default: float | None, exclusive_low: bool = False) -> object:
    """A pydantic Field bounded by ``SamplingParams``' range for ``name`` (one source of truth)."""
    low, high, _ = LIMITS[name]
    return Field(default, gt=0, le=high) if exclusive_low else Field(default, ge=low, le=high)


class _Body(BaseModel):
    """Strict JSON: wrong types, non-finite numbers and unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


# OpenAI options this server knows but does not implement, and why (each gets its own message).
UNSUPPORTED = {
    "echo": "echo is not supported: completions never include the prompt (prepend it yourself)",
    "suffix": "suffix is not supported: the model only continues text, it cannot fill in before a suffix",
    "best_of": "best_of is not supported (server-side ranking of candidates): ask for n completions instead",
    "presence_penalty": "presence_penalty is not supported; repetition_penalty (CTRL's, > 1 discourages "
                        "tokens already present) is the closest setting",
    "frequency_penalty": "frequency_penalty is not supported: penalties here do not grow with a token's count; "
                         "repetition_penalty (CTRL's) penalises every repeated token alike",
    "logit_bias": "logit_bias is not supported: no per-token biases (top_k, top_p and repetition_penalty are)",
}


class CompletionRequest(_Body):
    """OpenAI's ``POST /v1/completions`` body, plus top_k, repetition_penalty and ignore_eos."""

    model: Text | None = None
    prompt: Text | TokenIds | Annotated[list[Text], Field(max_length=MAX_PROMPTS)] | Annotated[
        list[TokenIds], Field(max_length=MAX_PROMPTS)] = ""
    max_tokens: int = _limit("max_new_tokens", 16)
    temperature: float = Field(1.0, ge=0, le=LIMITS["temperature"][1])
    top_p: float = _limit("top_p", 1.0, exclusive_low=True)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stop: Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)] | Annotated[
        list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_STRINGS)
    ] | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)  # choice j uses seed + j
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[Text, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=300)
    user: Text | None = None
    top_k: int = _limit("top_k", 0)
    repetition_penalty: float = _limit("repetition_penalty", 1.0)
    ignore_eos: bool = False

    def unsupported(self) -> tuple[str, str] | None:
        """The first OpenAI option set to something this server does not implement: (field, reason)."""
        used = {
            "echo": self.echo,
            "suffix": self.suffix is not None,
            "best_of": self.best_of not in (None, self.n),
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }
        return next(((name, UNSUPPORTED[name]) for name, on in used.items() if on), None)


class MegatronRequest(_Body):
    """Megatron-LM's ``PUT /api`` body (tools/run_text_generation_server.py)."""

    prompts: list[Text] = Field(min_length=1, max_length=MAX_PROMPTS)
    tokens_to_generate: int = _limit("max_new_tokens", 64)
    temperature: float = _limit("temperature", 1.0, exclusive_low=True)
    top_k: int = _limit("top_k", 0)
    top_p: float = Field(0.0, ge=0, le=1)
    logprobs: bool = False
    random_seed: int = Field(-1, ge=-1, lt=2**62)
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False

    @model_validator(mode="after")
    def _one_filter(self) -> MegatronRequest:
        if self.top_k > 0 and self.top_p > 0:
            raise ValueError("cannot set both top_k and top_p")
        return self
