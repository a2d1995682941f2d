"""Hugging Face interop: converted weights give GPT2LMHeadModel's logits, and export round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from mtnlg.checkpoint import load_model
from mtnlg.cli import main
from mtnlg.convert import from_hf, to_hf

transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    dict(vocab_size=257, n_positions=32, n_embd=96, n_layer=3, n_head=3, n_inner=200, layer_norm_epsilon=1e-6),
    dict(vocab_size=512, n_positions=48, n_embd=64, n_layer=1, n_head=8, activation_function="gelu"),
    dict(vocab_size=300, n_positions=40, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False),
]


def _random_hf_model(directory, **kwargs):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a mix-up would show
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("hf_config", CONFIGS)
def test_logits_match_hf(tmp_path, hf_config):
    hf = _random_hf_model(tmp_path / "hf", **hf_config)
    from_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, cfg, _ = load_model(tmp_path / "ckpt")
    idx = torch.randint(0, hf_config["vocab_size"], (2, hf_config["n_positions"] - 3))
    with torch.no_grad():
        expected = hf(idx).logits
        got = model(idx)[..., : hf_config["vocab_size"]]
    assert (got - expected).abs().max().item() < 1e-4
    assert cfg.model.n_layers == hf_config["n_layer"]


def test_export_round_trip_loads_in_transformers(tmp_path, small_tokenizer):
    hf = _random_hf_model(tmp_path / "hf", **CONFIGS[0])
    small_tokenizer.save(tmp_path / "hf")  # an HF dir with a tokenizer.json travels along
    from_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, _, tokenizer = load_model(tmp_path / "ckpt")
    assert tokenizer is not None and tokenizer.encode("quick fox") == small_tokenizer.encode("quick fox")
    to_hf(tmp_path / "ckpt", tmp_path / "back")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, atol=1e-5, rtol=1e-5)
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "back")
    assert hf_tok.encode("lazy dog jumps") == small_tokenizer.encode("lazy dog jumps")


def test_export_drops_vocab_padding(tmp_path, small_model_config):
    from mtnlg.checkpoint import save_model
    from mtnlg.config import Config
    from mtnlg.model import GPT

    torch.manual_seed(0)
    model = GPT(small_model_config).eval()
    assert small_model_config.padded_vocab_size > small_model_config.vocab_size
    save_model(tmp_path / "ckpt", model, Config(model=small_model_config))
    to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[..., :300], atol=1e-5, rtol=1e-5)


def test_pytorch_model_bin_and_cli(tmp_path):
    """Older HF checkpoints ship pytorch_model.bin (a pickled state dict) instead of safetensors."""
    hf = _random_hf_model(tmp_path / "hf", **CONFIGS[0])
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    model, _, _ = load_model(tmp_path / "ckpt")
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert (model(idx)[..., :300] - hf(idx).logits).abs().max() < 1e-4


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is not gpt2" in capsys.readouterr().err
