"""The scale planner: MT-NLG's published run, memory formulas against a real model, the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from mtnlg.cli import main
from mtnlg.config import ConfigError, ModelConfig
from mtnlg.config.presets import get_preset
from mtnlg.model.gpt import GPT
from mtnlg.planner import GPUS, make_layout, plan
from mtnlg.planner.memory import activation_bytes, layer_activation_bytes, rank_memory
from mtnlg.planner.search import candidates

MT_NLG = ["--preset", "mt-nlg-530b", "--tp", "8", "--gpu", "a100-80gb"]
# Smith et al. 2022: measured seconds per step of the 530B run at 280 / 350 / 420 DGX A100 nodes.
PUBLISHED_STEP_S = {2240: 60.1, 2800: 50.2, 3360: 44.4}


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_530b_parameter_count() -> None:
    cfg = get_preset("mt-nlg-530b")
    lay = make_layout(2240, 8, 35, global_batch=1920)
    assert 525e9 < plan(cfg, lay, GPUS["a100-80gb"]).parameters < 535e9


@pytest.mark.parametrize("gpus", sorted(PUBLISHED_STEP_S))
def test_mt_nlg_step_time_within_15_percent(capsys: pytest.CaptureFixture[str], gpus: int) -> None:
    code, out, _ = run_cli(capsys, *MT_NLG, "--gpus", str(gpus), "--pp", "35", "--global-batch", "1920", "--json")
    result = json.loads(out)
    assert code == 0 and result["fits"]
    assert result["layout"]["recompute"] == "full"  # the least recomputation that fits, as MT-NLG ran
    assert result["step_time_s"] == pytest.approx(PUBLISHED_STEP_S[gpus], rel=0.15)
    assert {"mfu", "memory_gib", "fits", "step_time_s", "days"} <= set(result)
    assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(result["memory_gib"])


def test_mt_nlg_fits_80gb_only_with_the_pipeline() -> None:
    cfg, gpu = get_preset("mt-nlg-530b"), GPUS["a100-80gb"]
    piped = plan(cfg, make_layout(2240, 8, 35, global_batch=1920, recompute="full"), gpu)
    assert piped.fits and piped.memory.total < 80 * 2**30
    for recompute in ("none", "selective", "full"):  # tp=8 alone: 1/8 of 530B x 18 bytes per GPU
        alone = plan(cfg, make_layout(2240, 8, 1, global_batch=2240, recompute=recompute), gpu)
        assert not alone.fits and alone.memory.weights + alone.memory.optimizer > 80 * 2**30
    no_recompute = plan(cfg, make_layout(2240, 8, 35, global_batch=1920), gpu)
    assert not no_recompute.fits  # 105 layers of activations in flight on the first stage


def test_search_ranks_only_fitting_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--preset", "gpt3-1.3b", "--gpus", "16", "--gpu", "a100-40gb", "--memory-gb", "12",
            "--global-batch", "64", "--micro-batch", "1", "--zero", "0", "--search", "--top", "1000"]
    code, out, _ = run_cli(capsys, *args, "--json")
    ranked = json.loads(out)
    assert code == 0 and ranked and all(p["fits"] for p in ranked)
    times = [p["step_time_s"] for p in ranked]
    assert times == sorted(times)
    gpu = GPUS["a100-40gb"].__class__(**{**json.loads(out)[0]["gpu"]})
    every = list(candidates(get_preset("gpt3-1.3b"), gpu, 16, 64, {"micro_batch": 1, "zero": 0}))
    assert len(ranked) == sum(p.fits for p in every) < len(every)  # some layouts do not fit and are left out
    code, text, _ = run_cli(capsys, *args[:-2], "--tp", "2")
    assert code == 0 and all("tp=2" in line for line in text.splitlines()[1:])


def test_recompute_auto_takes_the_least_recomputation_that_fits(capsys: pytest.CaptureFixture[str]) -> None:
    """none, then selective (mtnlg train's attention-core recomputation), then full: llama3-8b on tp=8 needs
    43.1 GiB without recomputation, 27.1 with selective and 18.9 with full (of 90 % of --memory-gb)."""
    args = ["--preset", "llama3-8b", "--gpus", "8", "--tp", "8", "--gpu", "h100-80gb", "--global-batch", "64"]
    for memory, level in (("50", "none"), ("35", "selective"), ("30", "full")):
        code, out, _ = run_cli(capsys, *args, "--memory-gb", memory, "--json")
        chosen = json.loads(out)
        assert code == 0 and chosen["fits"] and chosen["layout"]["recompute"] == level, memory
        assert ("--model.recompute=" in chosen["train_command"]) == (level != "none")
    code, out, _ = run_cli(capsys, *args, "--memory-gb", "35", "--search", "--top", "100", "--json")
    assert code == 0 and {p["layout"]["recompute"] for p in json.loads(out)} == {"selective", "full"}


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "2240", "--tp", "8", "--pp", "36"], "--tp 8 x --pp 36 = 288 does not divide --gpus 2240"),
    (["--gpus", "2240", "--tp", "8", "--pp", "35", "--dp", "4"], "not --gpus 2240"),
    (["--gpus", "2240", "--tp", "8", "--pp", "35", "--micro-batch", "7"], "not a multiple of --micro-batch"),
    (["--gpus", "16", "--tp", "3"], "does not divide --gpus 16"),
    (["--gpus", "8", "--gpu", "v100"], "unknown --gpu 'v100'"),
])
def test_bad_input_is_a_clear_error(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    base = ["--preset", "mt-nlg-530b", "--global-batch", "1920"]
    code, out, err = run_cli(capsys, *base, *(args if "--gpu" in args else [*args, "--gpu", "a100-80gb"]))
    assert code == 2 and out == "" and message in err and err.startswith("mtnlg plan: error:")


def test_missing_gpu_figures_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--preset", "tiny", "--gpus", "1", "--global-batch", "8", "--peak-tflops", "1")
    assert code == 2 and "--memory-gb" in err and "--hbm-gbps" in err


def test_layer_activations_are_korthikanti_formulas() -> None:
    """bf16 with dropout: sbh (10 + 24/t + 5as/ht) bytes; 34 sbh / t (+ 5as^2b / t) with sequence parallel;
    selective recomputation drops the attention-score terms; full keeps the 2sbh input."""
    cfg = ModelConfig(n_layers=4, hidden=1024, n_heads=16, seq_len=2048, dropout=0.1)
    s, b, h, a, t = 2048, 2, 1024, 16, 4
    sbh = s * b * h
    lay = make_layout(4, tp=t, global_batch=2, micro_batch=b)
    assert layer_activation_bytes(cfg, lay) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    sp = make_layout(4, tp=t, global_batch=2, micro_batch=b, sequence_parallel=True)
    assert layer_activation_bytes(cfg, sp) == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert layer_activation_bytes(cfg, sp, "selective") == pytest.approx(34 * sbh / t)
    assert layer_activation_bytes(cfg, lay, "full") == pytest.approx(2 * sbh)


def tiny_step(cfg: ModelConfig, batch: int) -> tuple[GPT, torch.optim.AdamW, int]:
    """One AdamW step of a tiny model on CPU; returns it with the bytes saved for backward (parameters
    excluded, each storage counted once: q, k, v are views of one matmul output)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    loss, saved = saved_bytes(model, lambda: model(x, targets=x))
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    return model, opt, saved


def saved_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``forward()``'s output and the bytes autograd saved for its backward: each storage counted once,
    ``model``'s parameters excluded (a saved-tensor probe)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    return out, sum(saved.values())


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_block_saved_bytes_match_the_planner_for_each_recompute_mode(recompute: str) -> None:
    """One block's saved tensors under ``model.recompute``: 16 sbh (fp32) plus flash's log-sum-exp (none),
    16 sbh (selective: q, k, v kept, the core's output and log-sum-exp recomputed), the sbh input (full).
    The measured rest is LayerNorm's per-row mean and rstd (0.5 % here)."""
    cfg = ModelConfig(vocab_size=500, seq_len=128, n_layers=2, hidden=128, n_heads=4, recompute=recompute)
    block = GPT(cfg).train().view([0], embeddings=False, head=False)  # block 0 alone: hidden states in and out
    x = torch.randn(2, cfg.seq_len, cfg.hidden, requires_grad=True)
    _, saved = saved_bytes(block, lambda: block(x))
    lay = make_layout(1, micro_batch=2, global_batch=2, precision="fp32", flash_attention=True)
    assert layer_activation_bytes(cfg, lay, recompute) == pytest.approx(saved, rel=0.03)


@pytest.fixture(scope="module")
def measured_step() -> tuple[ModelConfig, GPT, torch.optim.AdamW, int]:
    cfg = ModelConfig(vocab_size=500, seq_len=64, n_layers=2, hidden=64, n_heads=4)
    return cfg, *tiny_step(cfg, batch=4)


def test_activation_bytes_match_saved_tensors(measured_step: tuple) -> None:
    """fp32, no dropout: the model's SDPA is fused (keeps a log-sum-exp, not the scores). Tolerance 3 %:
    LayerNorm's per-row mean and rstd and the token ids are not in the formula (measured: 0.5 %)."""
    cfg, _, _, saved = measured_step
    lay = make_layout(1, micro_batch=4, global_batch=4, precision="fp32", flash_attention=True)
    assert activation_bytes(cfg, lay, first=True, last=True) == pytest.approx(saved, rel=0.03)


def test_parameter_gradient_and_adamw_bytes_exact(measured_step: tuple) -> None:
    cfg, model, opt, _ = measured_step
    params = list(model.parameters())  # the tied output weight is listed once
    mem = rank_memory(cfg, make_layout(1, micro_batch=4, global_batch=4, precision="fp32"), first=True, last=True)
    assert mem.weights == sum(p.nbytes for p in params)
    assert mem.gradients == sum(p.grad.nbytes for p in params)
    moments = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    assert mem.optimizer == sum(m.nbytes for m in moments)  # the per-tensor scalar step counters aside


def test_search_splits_a_long_sequence_with_context_parallelism(capsys: pytest.CaptureFixture[str]) -> None:
    """llama3-8b at 131072 tokens on 16 H100s: no layout without cp fits, the search ranks cp layouts and
    prints the train command that runs each; cp at least halves the activations and leaves the weights."""
    cfg = get_preset("llama3-8b")
    cfg.seq_len = 131072
    code, out, _ = run_cli(capsys, "--preset", "llama3-8b", "--model.seq_len=131072", "--gpus", "16", "--gpu",
                           "h100-80gb", "--global-batch", "16", "--tp", "8", "--search", "--json")
    plans = json.loads(out)
    assert code == 0 and plans and all(p["layout"]["cp"] > 1 and p["fits"] for p in plans)
    assert all(f"--parallel.cp={p['layout']['cp']}" in p["train_command"] for p in plans)
    one, two = (plan(cfg, make_layout(16, 8, dp=2 // cp, cp=cp, global_batch=16, recompute="full"), GPUS["h100-80gb"])
                for cp in (1, 2))
    assert not one.fits and two.memory.weights == one.memory.weights
    assert two.memory.activations < one.memory.activations / 2  # s / 2 tokens, and no s^2 scores for the ring
    with pytest.raises(ConfigError, match=r"--cp 3 needs model.seq_len % 6 == 0"):
        plan(cfg, make_layout(48, 8, cp=3, global_batch=16), GPUS["h100-80gb"])
