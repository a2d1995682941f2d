"""int8 and int4 inference: layer accuracy, perplexity of a trained model, save/load, CLI."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from mtnlg.checkpoint.directory import CheckpointError
from mtnlg.checkpoint.model import load_model, save_model
from mtnlg.cli import main
from mtnlg.config import Config, ModelConfig
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.generate.load import load_for_inference
from mtnlg.generate.quantize import (
    INT4_WEIGHTS_FILE,
    INT8_WEIGHTS_FILE,
    ONEDNN_MAX_ROWS,
    FP32Linear,
    Int4Linear,
    Int8Linear,
    onednn_linear_available,
    quantize_checkpoint,
    quantize_model,
    row_bucket,
    save_quantized,
)
from mtnlg.generate.quantize.int4 import dequantize_int4
from mtnlg.model.gpt import GPT

SEQ = 64


@contextmanager
def one_thread() -> Iterator[None]:
    """Training a model in a test: one thread stays fast on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stdlib_text() -> str:
    """~130k characters of English prose every Python install carries: standard-library docstrings."""
    docs = []
    for name in ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "textwrap", "unittest",
                 "functools", "shutil", "tempfile", "inspect"):
        module = importlib.import_module(name)
        objects = [module] + [o for _, o in sorted(vars(module).items())
                              if (inspect.isclass(o) or inspect.isfunction(o)) and o.__module__ == name]
        docs += [inspect.getdoc(o) or "" for o in objects]
    return "\n\n".join(d for d in docs if d)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[GPT, Config, Tokenizer, torch.Tensor, Path]:
    """A small GPT trained with AdamW for 250 steps; returns it, held-out tokens and its checkpoint."""
    text = stdlib_text()
    tokenizer = Tokenizer.train([text], vocab_size=512)
    ids = torch.tensor(tokenizer.encode(text))
    split = int(len(ids) * 0.9)
    train, held_out = ids[:split], ids[split:]
    cfg = Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=SEQ, n_layers=2, hidden=64, n_heads=4,
                                   padded_vocab_multiple=64))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with one_thread():
        for _ in range(250):
            starts = torch.randint(0, len(train) - SEQ - 1, (16,))
            x = torch.stack([train[s : s + SEQ] for s in starts])
            y = torch.stack([train[s + 1 : s + SEQ + 1] for s in starts])
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = save_model(tmp_path_factory.mktemp("ckpt") / "trained", model, cfg, tokenizer)
    return model, cfg, tokenizer, held_out, path


def perplexity(model: GPT, tokens: torch.Tensor) -> float:
    n = (len(tokens) - 1) // SEQ
    x, y = tokens[: n * SEQ].view(n, SEQ), tokens[1 : n * SEQ + 1].view(n, SEQ)
    with torch.no_grad():
        return math.exp(model(x, y).item())


def test_int8_linear_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 200)
    x = torch.randn(3, 5, 96)
    q = Int8Linear.from_linear(linear)
    assert q.weight_int8.dtype == torch.int8
    ref = linear(x)
    error = (q(x) - ref).norm() / ref.norm()
    assert error < 0.03


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
def test_a_state_dict_load_repacks_the_weights(kind: type) -> None:
    """The kernel's packed form is built on first use: a later load must not keep the old one."""
    torch.manual_seed(0)
    first, second = kind.from_linear(nn.Linear(128, 64)), kind.from_linear(nn.Linear(128, 64))
    x = torch.randn(2, 128)
    first(x)  # packed from the first weights
    first.load_state_dict(second.state_dict())
    torch.testing.assert_close(first(x), second(x))


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=pytest.mark.skipif(
    not onednn_linear_available(), reason="this torch build has no oneDNN Linear"))])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_linear_layouts_equal_nn_linear(onednn: bool, bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    fast = FP32Linear.from_linear(linear, onednn=onednn)
    assert fast.onednn == onednn and not fast.state_dict()  # an inference format, never saved
    for x in (torch.randn(1, 96), torch.randn(3, 5, 96), torch.randn(5, 3, 96).transpose(0, 1)):
        torch.testing.assert_close(fast(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN Linear")
def test_onednn_calls_use_few_shapes_and_the_same_results() -> None:
    """Rows are padded to one of 40 counts and split in pieces of at most 128, so the kernels oneDNN
    compiles per shape stay few (memory), and the results are those of the unpadded rows."""
    sizes = {row_bucket(r) for r in range(1, ONEDNN_MAX_ROWS + 1)}
    assert len(sizes) == 40 and max(sizes) == ONEDNN_MAX_ROWS
    assert all(r <= row_bucket(r) <= r * 1.125 for r in range(1, ONEDNN_MAX_ROWS + 1))
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    fast = FP32Linear.from_linear(linear, onednn=True)
    for rows in (17, 100, 129, 300):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(fast(x), linear(x), rtol=1e-5, atol=1e-5)


def test_fp32_layout_follows_the_batch_size(trained) -> None:
    """One sequence at a time (the generate CLI) gets the addmm layout, batches oneDNN's where built."""
    *_, path = trained
    layouts = {
        batch: {m.onednn for m in load_for_inference(path, max_batch_size=batch)[0].modules()
                if isinstance(m, FP32Linear)}
        for batch in (1, 8)
    }
    assert layouts == {1: {False}, 8: {onednn_linear_available()}}
    assert not any(m.onednn for m in Engine.from_checkpoint(path, max_batch_size=1).model.modules()
                   if isinstance(m, FP32Linear))


def test_fp32_inference_layout_computes_the_same_model(trained) -> None:
    model, _, tokenizer, held_out, path = trained
    fast, _, _ = load_for_inference(path)
    assert isinstance(fast.lm_head, FP32Linear) and not any(isinstance(m, nn.Linear) for m in fast.modules())
    x = held_out[: 2 * SEQ].view(2, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eod=True)
    prompts = ["Return the", "The default is"]
    expected = [c.tokens for c in Engine(model, tokenizer).generate(prompts, params)]
    assert [c.tokens for c in Engine(fast, tokenizer).generate(prompts, params)] == expected


def test_int8_perplexity_within_2_percent_of_fp32(trained) -> None:
    model, cfg, _, held_out, path = trained
    fp32 = perplexity(model, held_out)
    assert fp32 < cfg.model.vocab_size / 4  # the model did learn something
    int8_model, _, _ = load_for_inference(path, quantize="int8")
    int8 = perplexity(int8_model, held_out)
    assert abs(int8 / fp32 - 1) < 0.02, (fp32, int8)


def test_quantize_model_replaces_every_linear_and_keeps_embeddings(trained) -> None:
    _, _, _, _, path = trained
    model, _, _ = load_for_inference(path, quantize="int8")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    assert model.wte.weight.dtype == torch.float32


def test_saved_int8_checkpoint_loads_to_the_same_model(trained, tmp_path: Path) -> None:
    model, cfg, tokenizer, held_out, path = trained
    q = quantize_model(load_model(path)[0])
    out = save_quantized(tmp_path / "int8", q, cfg, tokenizer)
    assert (out / INT8_WEIGHTS_FILE).is_file() and not (out / "model.safetensors").exists()
    assert (out / INT8_WEIGHTS_FILE).stat().st_size < (path / "model.safetensors").stat().st_size
    loaded, loaded_cfg, loaded_tok = load_for_inference(out)
    x = held_out[:SEQ].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert loaded_cfg.model == cfg.model and loaded_tok.vocab_size == tokenizer.vocab_size


def test_int8_generation_mostly_agrees_with_fp32(trained) -> None:
    model, _, tokenizer, _, path = trained
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eod=True)
    prompts = ["Return the", "The default is", "If the file", "This module"]
    fp32 = Engine(model, tokenizer).generate(prompts, params)
    int8 = Engine.from_checkpoint(path, quantize="int8").generate(prompts, params)
    same = sum(a == b for f, i in zip(fp32, int8, strict=True) for a, b in zip(f.tokens, i.tokens, strict=True))
    assert same >= 0.75 * 16 * len(prompts)


def test_cli_quantize_then_generate(trained, tmp_path: Path, capsys) -> None:
    _, _, _, _, path = trained
    assert main(["quantize", "--checkpoint", str(path), "--out", str(tmp_path / "q")]) == 0
    args = ["--prompt", "The default is", "--max-new-tokens", "8", "--temperature", "0"]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), *args]) == 0
    saved = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(path), "--quantize", "int8", *args]) == 0
    assert capsys.readouterr().out == saved and saved.startswith("The default is")


def test_bad_requests_are_clear_errors(trained, tmp_path: Path) -> None:
    _, _, _, _, path = trained
    with pytest.raises(ValueError, match="unknown quantization 'int2'"):
        load_for_inference(path, quantize="int2")
    with pytest.raises(ValueError, match="int4 inference runs on CPU"):
        load_for_inference(path, quantize="int4", device="cuda")
    with pytest.raises(ValueError, match="runs on CPU"):
        load_for_inference(path, quantize="int8", device="cuda")
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(tmp_path / "x", GPT(ModelConfig(vocab_size=64, seq_len=8, n_layers=1, hidden=8, n_heads=2)),
                       Config())
    q = quantize_checkpoint(path, tmp_path / "q")
    config = (q / "config.json").read_text().replace('"n_layers": 2', '"n_layers": 3')
    (q / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="config.json is corrupted"):  # the manifest notices the edit
        load_for_inference(q)
    (q / "checksums.json").unlink()  # a hand-edited checkpoint without one: the weights do not fit
    with pytest.warns(UserWarning, match="no checksums.json"), pytest.raises(
            CheckpointError, match="blocks.2.attn.qkv_proj.weight_int8"):
        load_for_inference(q)


@pytest.mark.parametrize("out_features", [192, 200])  # the int4 kernel's rows come in 16s; 200 is dequantized
def test_int4_linear_is_close_to_fp32(out_features: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, out_features)
    q = Int4Linear.from_linear(linear)
    assert q.weight_int4.dtype == torch.uint8 and q.weight_int4.shape == (out_features, 128)
    assert q.weight_scale.shape == (out_features, 2) and q.uses_kernel == (out_features % 16 == 0)
    x = torch.randn(3, 5, 256)
    ref = linear(x)
    dequantized = x @ dequantize_int4(q.weight_int4, q.weight_scale, q.weight_offset).t() + linear.bias
    assert ((q(x) - dequantized).norm() / ref.norm()) < 0.01  # the kernel computes the stored weights
    assert ((q(x) - ref).norm() / ref.norm()) < 0.12  # 16 levels per group: ~9 % on Gaussian weights


def test_int4_perplexity_within_5_percent_of_fp32_and_round_trips(trained, tmp_path: Path, capsys) -> None:
    model, cfg, _, held_out, path = trained
    fp32 = perplexity(model, held_out)
    int4_model, _, _ = load_for_inference(path, quantize="int4")
    assert all(m.group_size == 64 for m in int4_model.modules() if isinstance(m, Int4Linear) and m.in_features == 64)
    int4 = perplexity(int4_model, held_out)
    assert abs(int4 / fp32 - 1) < 0.05, (fp32, int4)
    assert main(["quantize", "--checkpoint", str(path), "--out", str(tmp_path / "q4"), "--dtype", "int4"]) == 0
    out = tmp_path / "q4"
    assert (out / INT4_WEIGHTS_FILE).is_file() and not (out / INT8_WEIGHTS_FILE).exists()
    # 0.53 bytes per Linear weight vs 4; the fp32 embeddings (and the output layer's own copy) are most of the rest
    assert (out / INT4_WEIGHTS_FILE).stat().st_size < 0.45 * (path / "model.safetensors").stat().st_size
    loaded = load_for_inference(out)[0]
    x = held_out[:SEQ].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(x), int4_model(x))
    args = ["--prompt", "The default is", "--max-new-tokens", "8", "--temperature", "0"]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), *args]) == 0
    saved = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(path), "--quantize", "int4", *args]) == 0
    assert capsys.readouterr().out == saved and saved.startswith("The default is")
