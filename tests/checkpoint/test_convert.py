"""Hugging Face interop: converted weights give GPT2LMHeadModel's logits, and export round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from mtnlg.checkpoint.convert import from_hf, to_hf
from mtnlg.checkpoint.model import load_model
from mtnlg.cli import main

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
    vocab = small_tokenizer.vocab_size  # every id the tokenizer makes needs an embedding row
    hf = _random_hf_model(tmp_path / "hf", **{**CONFIGS[0], "vocab_size": vocab})
    small_tokenizer.save(tmp_path / "hf")  # an HF dir with a tokenizer.json travels along
    from_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, _, tokenizer = load_model(tmp_path / "ckpt")
    assert tokenizer is not None and tokenizer.encode("quick fox") == small_tokenizer.encode("quick fox")
    to_hf(tmp_path / "ckpt", tmp_path / "back")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    idx = torch.randint(0, vocab, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, atol=1e-5, rtol=1e-5)
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "back")
    assert hf_tok.encode("lazy dog jumps") == small_tokenizer.encode("lazy dog jumps")


def test_export_drops_vocab_padding(tmp_path, small_model_config):
    from mtnlg.checkpoint.model import save_model
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
    (tmp_path / "hf").mkdir()
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert "model_type 'bert' is not supported" in capsys.readouterr().err
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert "config.json: missing 'num_attention_heads'" in capsys.readouterr().err


@pytest.fixture
def tokenizerless(tmp_path, small_tokenizer):
    """An HF directory without a tokenizer, converted; and a tokenizer directory that fits it."""
    _random_hf_model(tmp_path / "hf", **{**CONFIGS[0], "vocab_size": small_tokenizer.vocab_size})
    small_tokenizer.save(tmp_path / "tok")
    return tmp_path / "hf", tmp_path / "tok"


def test_a_checkpoint_without_tokenizer_is_refused_by_name_then_works_with_one(tmp_path, tokenizerless, capsys):
    hf_dir, tok = tokenizerless
    ckpt = str(tmp_path / "ckpt")
    assert main(["convert", "--from-hf", str(hf_dir), "--out", ckpt]) == 0
    assert "has no tokenizer" in capsys.readouterr().out and load_model(ckpt)[2] is None
    prompt = ["--prompt", "The quick fox", "--max-new-tokens", "4", "--temperature", "0"]
    assert main(["generate", "--checkpoint", ckpt, *prompt]) == 2
    assert "has no tokenizer" in (err := capsys.readouterr().err) and "--tokenizer DIR" in err
    assert main(["generate", "--checkpoint", ckpt, "--tokenizer", str(tok), *prompt]) == 0
    assert capsys.readouterr().out.startswith("The quick fox")


def test_serve_takes_a_tokenizer_too(tmp_path, tokenizerless, small_tokenizer):
    """``serve`` loads its engine through the same path; checked without starting a server."""
    from mtnlg.cli import build_parser
    from mtnlg.cli.engine import load_engine
    from mtnlg.config import ConfigError

    hf_dir, tok = tokenizerless
    from_hf(hf_dir, tmp_path / "ckpt")
    args, _ = build_parser().parse_known_args(["serve", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer",
                                               str(tok)])
    engine = load_engine(args.checkpoint, args, max_batch_size=2)
    assert engine.tokenizer.encode("lazy dog") == small_tokenizer.encode("lazy dog")
    args.tokenizer = None
    with pytest.raises(ConfigError, match="has no tokenizer"):
        load_engine(args.checkpoint, args, max_batch_size=2)


def test_convert_stores_the_given_tokenizer_and_refuses_one_too_big(tmp_path, tokenizerless, small_tokenizer, capsys):
    hf_dir, tok = tokenizerless
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--tokenizer", str(tok)]) == 0
    assert "has no tokenizer" not in capsys.readouterr().out
    assert load_model(tmp_path / "ckpt")[2].encode("five dozen") == small_tokenizer.encode("five dozen")
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    _random_hf_model(tmp_path / "small", **CONFIGS[0] | {"vocab_size": 100})
    assert main(["convert", "--from-hf", str(tmp_path / "small"), "--out", str(tmp_path / "x"), "--tokenizer",
                 str(tok)]) == 2
    assert f"the tokenizer has {small_tokenizer.vocab_size} tokens but the model's vocabulary only 100" in (
        capsys.readouterr().err)
