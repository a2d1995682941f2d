"""Request bodies of the HTTP API: OpenAI's completions and Megatron-LM's ``PUT /api``.

Strict JSON: wrong types and unknown fields are errors (400, naming the field), not silently
coerced or ignored; known OpenAI options this server does not implement are refused by name.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtnlg.generate.sequence import MAX_TOP_LOGPROBS


class _Body(BaseModel):
    """Strict JSON: wrong types and unknown fields are errors, not silently coerced or ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)


class CompletionRequest(_Body):
    """OpenAI's ``POST /v1/completions`` body, plus top_k, repetition_penalty and ignore_eos."""

    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]] = ""
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        unsupported = {
            "echo": self.echo,
            "suffix": self.suffix is not None,
            "best_of": self.best_of not in (None, self.n),
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }
        bad = [name for name, used in unsupported.items() if used]
        if bad:
            raise ValueError(f"not supported by this server: {', '.join(bad)} (use repetition_penalty)")
        return self


class MegatronRequest(_Body):
    """Megatron-LM's ``PUT /api`` body (tools/run_text_generation_server.py)."""

    prompts: list[str] = Field(min_length=1, max_length=64)
    tokens_to_generate: int = Field(64, ge=0)
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0)
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
