"""One table of sampling limits (mtnlg.config.sampling.SAMPLING): the config, SamplingParams, the
HTTP schema and the generate flags accept and refuse the same values, with the same message."""

from __future__ import annotations

import dataclasses
import re

import pytest
from pydantic import ValidationError

from mtnlg.cli import main
from mtnlg.config import ConfigError, GenerateConfig, build_config
from mtnlg.config.sampling import SAMPLING
from mtnlg.generate.sequence import SamplingParams
from mtnlg.serve.protocol import ChatCompletionRequest, CompletionRequest

CONFIG_FIELDS = [f.name for f in dataclasses.fields(GenerateConfig)]
API_NAMES = {"max_new_tokens": "max_tokens"}  # SamplingParams name -> OpenAI body name
OUT_OF_RANGE = {"max_new_tokens": [-1, 2**31], "temperature": [-0.5, 150.0], "top_k": [-1, 2**31],
                "top_p": [0.0, 1.5], "repetition_penalty": [0.0, 0.001, 101.0], "seed": [-1, 2**63],
                "logprobs": [-1, 21]}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_setting_has_out_of_range_cases_here():
    assert set(OUT_OF_RANGE) == set(SAMPLING)


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in OUT_OF_RANGE.items() for v in vs])
def test_an_out_of_range_value_is_refused_everywhere_with_the_same_rule(name, value, capsys):
    rule = SAMPLING[name].rule()
    with pytest.raises(ValueError, match="^" + re.escape(f"{name} {rule}, got ")):
        SamplingParams(**{name: value}).validate()
    if name != "seed":  # the API's seed leaves room for seed + j of choice j (below)
        with pytest.raises(ValidationError):
            CompletionRequest(prompt="x", **{API_NAMES.get(name, name): value})
    if name not in CONFIG_FIELDS:
        return
    with pytest.raises(ConfigError) as refused:
        build_config(overrides=[f"--generate.{name}={value}"])
    assert str(refused.value) == f"generate.{name} {rule}, got {float(value) if isinstance(value, float) else value!r}"
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--checkpoint", "no-such-dir", _flag(name), str(value)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and _flag(name) in err and f"generate.{name} {rule}" in err


def test_temperature_150_is_a_config_error():
    with pytest.raises(ConfigError, match=r"generate.temperature must be a number in \[0, 100\]"):
        build_config(overrides=["--generate.temperature=150"])


@pytest.mark.parametrize("name", list(SAMPLING))
def test_the_bounds_are_accepted_everywhere(name):
    s = SAMPLING[name]
    for value in (s.lowest if s.kind is float else s.low, s.high):
        value = s.kind(value)
        SamplingParams(**{name: value}).validate()
        if name != "seed":
            CompletionRequest(prompt="x", **{API_NAMES.get(name, name): value})
        if name in CONFIG_FIELDS:
            assert getattr(build_config(overrides=[f"--generate.{name}={value!r}"]).generate, name) == value


def _bounds(prop: dict) -> dict:
    """A property's numeric bounds in the OpenAPI (JSON) schema; an Optional's live in its anyOf."""
    for option in prop.get("anyOf", [prop]):
        if {"minimum", "exclusiveMinimum", "maximum"} & option.keys():
            return {k: option[k] for k in ("minimum", "exclusiveMinimum", "maximum") if k in option}
    return {}


@pytest.mark.parametrize("body", [CompletionRequest, ChatCompletionRequest])
def test_the_openapi_schema_bounds_and_defaults_are_the_tables(body):
    props = body.model_json_schema()["properties"]
    names = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
             "repetition_penalty": "repetition_penalty",
             "logprobs": "logprobs" if body is CompletionRequest else "top_logprobs"}
    for name, api in names.items():
        s = SAMPLING[name]
        low = {"exclusiveMinimum": s.low} if s.low_open else {"minimum": s.low}
        assert _bounds(props[api]) == {**low, "maximum": s.high}, api
        if name not in ("max_new_tokens", "logprobs"):  # OpenAI's own defaults: 16 tokens, no log-probs
            assert props[api]["default"] == s.default, api
            assert "In " + s.range_text() in props[api]["description"]
    seed = _bounds(props["seed"])
    assert seed["minimum"] == SAMPLING["seed"].low and seed["maximum"] + 15 == SAMPLING["seed"].high


def test_the_defaults_are_the_tables():
    cfg, params = GenerateConfig(), SamplingParams()
    for name in CONFIG_FIELDS:
        assert getattr(cfg, name) == SAMPLING[name].default
        if name != "seed":  # a request without a seed draws one from the engine's stream
            assert getattr(params, name) == SAMPLING[name].default
    assert SamplingParams.from_config(cfg).seed == cfg.seed


def test_non_numbers_are_refused_by_the_config_and_the_engine():
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="^temperature must be"):
            SamplingParams(temperature=bad).validate()
    with pytest.raises(ConfigError, match="generate.temperature must be"):
        build_config(overrides=["--generate.temperature=nan"])
