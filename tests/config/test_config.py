"""Configuration: presets, parameter counts, TOML + overrides, and clear errors."""

from __future__ import annotations

import pytest
import torch

from mtnlg.config import ConfigError, ModelConfig, build_config, config_from_dict, parse_overrides
from mtnlg.config.families import recompute_mode
from mtnlg.config.presets import PRESETS, get_preset
from mtnlg.model.counts import flops_per_token, model_info, parameter_count
from mtnlg.model.gpt import GPT


def test_gpt2_small_has_124_4m_parameters():
    total = parameter_count(get_preset("gpt2-small"))["total"]
    assert abs(total - 124.4e6) / 124.4e6 < 0.005


def test_mt_nlg_530b_has_530b_parameters():
    cfg = get_preset("mt-nlg-530b")
    assert (cfg.n_layers, cfg.hidden, cfg.n_heads, cfg.seq_len, cfg.ffn_size) == (105, 20480, 128, 2048, 81920)
    assert abs(parameter_count(cfg)["total"] - 530e9) / 530e9 < 0.01


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_count_matches_the_built_model(name):
    with torch.device("meta"):  # nothing is allocated, so even 530B is instant
        model = GPT(get_preset(name))
    assert model.num_parameters() == parameter_count(get_preset(name))["total"]


def test_untied_output_layer_is_counted():
    cfg = ModelConfig(vocab_size=100, seq_len=8, n_layers=1, hidden=16, n_heads=2, tie_embeddings=False)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.lm_head.weight is not model.wte.weight
    assert model.num_parameters() == parameter_count(cfg)["total"]


def test_flops_per_token_follows_6n_plus_attention():
    cfg = get_preset("gpt2-small")
    flops = flops_per_token(cfg)
    n_matmul = 12 * 12 * 768**2 + cfg.padded_vocab_size * 768
    assert flops["train"] == 3 * flops["forward"]
    assert flops["forward"] == 2 * n_matmul + 4 * 12 * 1024 * 768
    assert model_info(cfg).train_flops_per_token == flops["train"]


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nhidden = 128\nn_heads = 4\n[train]\nlr = 3e-4\nprecision = "bf16"\n')
    cfg = build_config("tiny", path, ["--model.n_layers=3", "--train.lr", "1e-3", "--data.data_path=0.3,a,0.7,b"])
    assert (cfg.model.hidden, cfg.model.n_heads, cfg.model.n_layers) == (128, 4, 3)
    assert cfg.model.vocab_size == get_preset("tiny").vocab_size  # untouched preset field survives
    assert cfg.train.lr == 1e-3 and cfg.train.precision == "bf16"
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]


def test_json_round_trip():
    cfg = build_config("gpt2-medium", overrides=["--train.steps=7", "--model.activation_checkpointing=true"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.model.activation_checkpointing is True


def test_a_config_from_before_model_recompute_loads_with_its_checkpointing_as_full():
    """A checkpoint's config.json written before ``model.recompute`` existed: the field is absent and
    ``activation_checkpointing`` still means whole-block recomputation."""
    data = build_config("gpt2-medium", overrides=["--model.activation_checkpointing=true"]).to_dict()
    del data["model"]["recompute"]
    model = config_from_dict(data).model
    assert (model.recompute, recompute_mode(model)) == ("none", "full")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.hiden=3"], "did you mean 'hidden'"),
        (["--modle.hidden=3"], "did you mean 'model'"),
        (["--model.n_heads=5"], "not divisible by model.n_heads=5"),
        (["--model.hidden=abc"], "model.hidden: expected int, got 'abc'"),
        (["--model.dropout=1.5"], "model.dropout must be in [0, 1)"),
        (["--train.precision=fp4"], "train.precision must be one of fp32, bf16, fp16, fp8"),
        (["--model.hidden"], "needs a value"),
        (["hidden=3"], "overrides look like --section.field=value"),
    ],
)
def test_bad_values_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config("tiny", overrides=overrides)
    assert message in str(err.value)


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nhidden = \n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        build_config(file=path)
    path.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown field of \[model\] 'width'"):
        build_config(file=path)
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(file=tmp_path / "missing.toml")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        build_config("gpt5")


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c.d", "x y"]) == [("a.b", "1"), ("c.d", "x y")]


def test_info_cli_json_and_errors(capsys):
    import json

    from mtnlg.cli import main

    assert main(["info", "--preset", "mt-nlg-530b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["parameters"] - 530e9) / 530e9 < 0.01 and info["model"]["n_layers"] == 105
    assert main(["info", "--preset", "tiny", "--model.n_heads=3"]) == 2
    assert "not divisible" in capsys.readouterr().err
