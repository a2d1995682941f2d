"""Request bodies of the HTTP API: OpenAI's completions and chat completions, Megatron-LM's ``PUT /api``.

Strict JSON: wrong types and unknown fields are errors (400, naming the field), not silently
coerced or ignored. Every field is range-checked here, at the edge, so that nothing a client can
send makes the batch worker fail: numbers must be finite (JSON's non-standard ``NaN`` and
``Infinity`` are refused) and within the ranges of ``mtnlg.config.sampling.SAMPLING`` (OpenAI's documented
ones where it has them), strings must be valid Unicode (a lone UTF-16 surrogate, which JSON's
``\\ud800`` escape can carry, is refused), and lists are bounded. Known OpenAI options this server
does not implement are refused by name, each with its own reason (``unsupported``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from mtnlg.config.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SAMPLING, sampling_help

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


MAX_CHOICES = 16  # n: completions per prompt

_DEFAULT = object()


def _limit(name: str, default: object = _DEFAULT, **bounds: float) -> object:
    """A pydantic Field with ``SAMPLING[name]``'s range, default and help (the one table the config,
    the engine and the CLI read). ``bounds`` replace the table's where an API's meaning differs
    (Megatron's temperature must be > 0, its top_p 0 means off, -1 a random seed); such a field's
    schema then has no description, since the table's would be wrong for it."""
    s = SAMPLING[name]
    low = {} if bounds.keys() & {"gt", "ge"} else {"gt": s.low} if s.low_open else {"ge": s.low}
    limits = {**low, "le": s.high, **bounds}
    described = {} if bounds else {"description": sampling_help(name)}
    return Field(s.default if default is _DEFAULT else default, **limits, **described)


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


StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _SamplingBody(_Body):
    """The fields OpenAI's completions and chat completions share, plus top_k, repetition_penalty
    and ignore_eos."""

    model: Text | None = None
    max_tokens: int | None = _limit("max_new_tokens", 16)  # OpenAI's default
    temperature: float = _limit("temperature")
    top_p: float = _limit("top_p")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = _limit("seed", None, le=SAMPLING["seed"].high - (MAX_CHOICES - 1))  # choice j: seed + j
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[Text, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=300)
    user: Text | None = None
    top_k: int = _limit("top_k")
    repetition_penalty: float = _limit("repetition_penalty")
    ignore_eos: bool = False

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def alternatives(self) -> int | None:
        """How many alternatives to report per token (None: no log-probs at all)."""
        return None

    def _used(self) -> dict[str, bool]:
        return {
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }

    def unsupported(self) -> tuple[str, str] | None:
        """The first option set to something this server does not implement or a combination it
        refuses: (field, reason)."""
        return next(((name, UNSUPPORTED[name]) for name, on in self._used().items() if on), None)


class CompletionRequest(_SamplingBody):
    """OpenAI's ``POST /v1/completions`` body."""

    prompt: Text | TokenIds | Annotated[list[Text], Field(max_length=MAX_PROMPTS)] | Annotated[
        list[TokenIds], Field(max_length=MAX_PROMPTS)] = ""
    max_tokens: int = _limit("max_new_tokens", 16)
    logprobs: int | None = _limit("logprobs", None)
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @property
    def alternatives(self) -> int | None:
        return self.logprobs

    def _used(self) -> dict[str, bool]:
        own = {"echo": self.echo, "suffix": self.suffix is not None, "best_of": self.best_of not in (None, self.n)}
        return {**own, **super()._used()}


class TextPart(_Body):
    """A part of a message's content; only text parts (no images or audio: the model reads text)."""

    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    """One turn. The role is checked against the chat template (``developer`` is OpenAI's newer
    name for ``system``); content is a string or a list of text parts, joined."""

    role: Text
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_PROMPTS)]

    def plain(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_SamplingBody):
    """OpenAI's ``POST /v1/chat/completions`` body. Without ``max_tokens`` (or its newer name
    ``max_completion_tokens``) the answer may fill the rest of the context; the assistant's turn
    ends at the template's end marker, which takes one of the stop strings (so three are left)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: int | None = _limit("max_new_tokens", None)
    max_completion_tokens: int | None = _limit("max_new_tokens", None)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS - 1)] | None = None
    logprobs: bool = False
    top_logprobs: int | None = _limit("logprobs", None)

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            return "max_completion_tokens", "max_tokens and max_completion_tokens differ: give one of them"
        return super().unsupported()

    @property
    def limit(self) -> int | None:
        """Tokens to generate at most (None: the rest of the context)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class MegatronRequest(_Body):
    """Megatron-LM's ``PUT /api`` body (tools/run_text_generation_server.py)."""

    prompts: list[Text] = Field(min_length=1, max_length=MAX_PROMPTS)
    tokens_to_generate: int = _limit("max_new_tokens", 64)
    temperature: float = _limit("temperature", gt=0)  # Megatron's: 0 is no temperature
    top_k: int = _limit("top_k")
    top_p: float = _limit("top_p", 0.0, ge=0)  # Megatron's: 0 means off
    logprobs: bool = False
    random_seed: int = _limit("seed", -1, ge=-1)  # -1: a random seed
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False

    @model_validator(mode="after")
    def _one_filter(self) -> MegatronRequest:
        if self.top_k > 0 and self.top_p > 0:
            raise ValueError("cannot set both top_k and top_p")
        return self
