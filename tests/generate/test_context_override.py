"""A trained rotary model run at a longer context at load (``--seq-len``, ``--rope-scaling``, ...): the
loaded model equals one built with the extended config, and bad overrides fail before the weights load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint.model import load_model, save_model
from mtnlg.cli import main
from mtnlg.config import Config, ConfigError, ModelConfig
from mtnlg.generate.engine import Engine
from mtnlg.generate.load import load_for_inference
from mtnlg.model.gpt import GPT
from mtnlg.model.rope import extend_context

ROPE = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


@pytest.fixture
def rope_ckpt(tmp_path: Path, small_tokenizer) -> Path:
    cfg = Config(model=ModelConfig(vocab_size=small_tokenizer.vocab_size, seq_len=32, n_layers=1, hidden=32,
                                   n_heads=2, padded_vocab_multiple=64, **ROPE))
    torch.manual_seed(0)
    return save_model(tmp_path / "rope", GPT(cfg.model), cfg, small_tokenizer)


def test_extend_context_fills_the_scaling_and_refuses_what_cannot_extend() -> None:
    cfg = ModelConfig(seq_len=1024, **ROPE)
    line = extend_context(cfg, seq_len=4096, rope_scaling="yarn")
    assert (cfg.seq_len, cfg.rope_factor, cfg.rope_original_len) == (4096, 4.0, 1024)
    assert line == "context: 4096 tokens (trained at 1024), rope_scaling=yarn factor 4 from 1024"
    learned = ModelConfig(seq_len=1024)
    with pytest.raises(ConfigError, match="model.seq_len=2048 with model.position=learned"):
        extend_context(learned, seq_len=2048)
    with pytest.raises(ConfigError, match="rope_scaling"):
        extend_context(cfg, rope_scaling="ntk")
    assert cfg.rope_scaling == "yarn" and cfg.seq_len == 4096  # a refused override changes nothing
    extend_context(learned, seq_len=512)  # shorter than trained: the table has the rows
    assert learned.seq_len == 512


def test_the_loaded_model_equals_one_built_at_the_longer_context(rope_ckpt: Path) -> None:
    context = {"seq_len": 128, "rope_scaling": "llama3", "rope_factor": 4.0}
    model, cfg, _ = load_for_inference(rope_ckpt, context=context)
    plain, _, _ = load_model(rope_ckpt)
    ref = GPT(dataclasses.replace(plain.cfg, seq_len=128, rope_scaling="llama3", rope_factor=4.0,
                                  rope_original_len=32)).eval()
    ref.load_state_dict(plain.state_dict())
    x = torch.randint(0, cfg.model.vocab_size, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert Engine(model, None, config=cfg).seq_len == 128


def test_generate_takes_a_prompt_past_the_trained_context(rope_ckpt: Path, capsys) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # over 32 tokens
    argv = ["generate", "--checkpoint", str(rope_ckpt), "--prompt", prompt, "--max-new-tokens", "2"]
    assert main(argv) == 2 and "exceeds the context length 32" in capsys.readouterr().err
    assert main([*argv, "--seq-len", "128", "--rope-scaling", "yarn"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt.strip()[:20]) and "context: 128 tokens (trained at 32), rope_scaling=yarn" in err


def test_a_bad_override_fails_before_the_weights_load(rope_ckpt: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(Engine, "from_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
    code = main(["serve", "--checkpoint", str(rope_ckpt), "--rope-scaling", "yarn", "--rope-factor", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "model.rope_factor must be >= 1" in err and "Traceback" not in err
