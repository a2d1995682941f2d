"""Muon (``train.optimizer=muon``): one step against the textbook update, the parameter split, the
warmup-stable-decay schedule, and what is refused (Muon under ZeRO 1/2, fp8 without a Hopper GPU).
The multi-rank equalities are in tests/parallel/test_zero.py; the resume in tests/train/test_trainer.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from mtnlg.config import Config, ConfigError, ModelConfig, TrainConfig, build_config
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.zero import check_zero
from mtnlg.planner.layout import Layout
from mtnlg.planner.memory import rank_state
from mtnlg.train.build import build_model
from mtnlg.train.muon import MuonAdamW, muon_parameter_names, orthogonalise
from mtnlg.train.optim import build_optimizer, learning_rate
from tests.harness.training import make_trainer


def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Jordan et al. (2024), in float64: X <- aX + (bA + cA^2)X, A = XX^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double() / g.double().norm()
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


@pytest.mark.parametrize("shape", [(6, 10), (12, 5)])
def test_one_muon_step_is_the_textbook_update(shape: tuple[int, int]) -> None:
    """Two steps on one matrix (the second one uses the Nesterov momentum) against the formula, written out
    in float64; mtnlg's iteration runs in fp32 on CPUs."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    lr, wd, mu = 0.05, 0.1, 0.95
    optimizer = MuonAdamW([{"params": [weight], "weight_decay": wd}], [], lr=lr, momentum=mu, adamw={})
    expected, buf = weight.detach().double().clone(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(2):
        grad = torch.randn(shape)
        weight.grad = grad.clone()
        optimizer.step()
        buf = mu * buf + (1 - mu) * grad.double()
        update = _newton_schulz((1 - mu) * grad.double() + mu * buf)
        expected = expected * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(shape)) * update  # AdamW's RMS
    torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_stacked_expert_weights_step_as_separate_matrices() -> None:
    """A 3-D (E, out, in) expert weight: each expert's matrix takes the 2-D step (its own orthogonalisation and
    (out, in) learning-rate scale), as E separate parameters would."""
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 6, 10))
    single = [torch.nn.Parameter(m.clone()) for m in stacked.detach()]
    args = dict(lr=0.05, momentum=0.95, adamw={})
    both = [MuonAdamW([{"params": [stacked], "weight_decay": 0.1}], [], **args),
            MuonAdamW([{"params": single, "weight_decay": 0.1}], [], **args)]
    for _ in range(2):
        grad = torch.randn(3, 6, 10)
        stacked.grad = grad.clone()
        for p, g in zip(single, grad, strict=True):
            p.grad = g.clone()
        for optimizer in both:
            optimizer.step()
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in single]), rtol=0, atol=0)


def test_the_bf16_iteration_is_torchs_muon_bit_for_bit() -> None:
    """``orthogonalise`` in bf16 (what a GPU runs) is ``torch.optim.Muon``'s kernel: same update, same bits."""
    torch.manual_seed(0)
    grad = torch.randn(24, 40)
    weight = torch.nn.Parameter(torch.randn(24, 40))
    reference = torch.optim.Muon([weight], lr=0.02, weight_decay=0.0, momentum=0.0, nesterov=False)
    before = weight.detach().clone()
    weight.grad = grad.clone()
    reference.step()
    ortho = orthogonalise(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.bfloat16)
    assert torch.equal(ortho, _zeropower_via_newtonschulz(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7))
    torch.testing.assert_close(weight.detach(), before - 0.02 * ortho.float(), rtol=0, atol=1e-7)
    fp32 = orthogonalise(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    assert 1e-3 < (fp32 - ortho.float()).abs().max() < 0.1  # bf16: a few significant bits fewer


def test_muon_takes_the_block_matrices_and_adamw_the_rest() -> None:
    model_cfg = ModelConfig(vocab_size=128, seq_len=16, n_layers=2, hidden=32, n_heads=4, padded_vocab_multiple=64,
                            moe_experts=4, moe_every=2, position="rope", norm="rmsnorm", mlp="swiglu",
                            tie_embeddings=False)
    cfg = Config(model=model_cfg, train=TrainConfig(optimizer="muon", device="cpu")).validate()
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.train)
    assert isinstance(optimizer, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon == muon_parameter_names(model) and not muon & adamw and muon | adamw == set(names.values())
    assert "blocks.0.attn.qkv_proj.weight" in muon and "blocks.0.mlp.fc_gate.weight" in muon
    assert {"wte.weight", "lm_head.weight", "ln_f.weight", "blocks.0.ln_1.weight"} <= adamw
    assert any("router" in n for n in adamw) and any(n.endswith("experts.fc_in_bias") for n in adamw)
    assert {"blocks.1.mlp.experts.fc_in_weight", "blocks.1.mlp.experts.fc_out_weight"} <= muon  # per-expert matrices
    assert optimizer.param_groups == optimizer.muon.param_groups + optimizer.adamw.param_groups


def test_warmup_stable_decay_schedule() -> None:
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, steps=110, lr_schedule="wsd", decay_fraction=0.2)
    lrs = [learning_rate(cfg, step, 0) for step in (0, 9, 10, 50, 89, 90, 100, 110)]
    assert lrs == pytest.approx([0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55, 0.1])


def test_muon_under_zero_1_or_2_is_refused() -> None:
    cfg = Config(parallel=dataclasses.replace(Config().parallel, zero=1), train=TrainConfig(optimizer="muon"))
    with pytest.raises(ConfigError, match=r"^parallel.zero=1/2 with train.optimizer=muon .*use parallel.zero=3$"):
        check_zero(cfg, ParallelDims(dp=2, pp=1, tp=1, world_size=2))


def test_fp8_on_cpu_fails_with_one_line_naming_the_requirement() -> None:
    cfg = Config(model=ModelConfig(vocab_size=64, seq_len=8, n_layers=1, hidden=16, n_heads=2),
                 train=TrainConfig(precision="fp8", device="cpu")).validate()
    with pytest.raises(ConfigError) as err:
        build_model(cfg, torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and "compute capability >= 8.9" in message and "torchao" in message
    assert message.endswith("this run is on cpu: use train.precision=bf16")


def test_the_modern_recipe_config_builds_and_trains_a_step(tmp_path) -> None:
    """configs/modern.toml on the demo's preset: Llama-style blocks, Muon, WSD; one step, a finite loss."""
    cfg = build_config("tiny", Path(__file__).resolve().parents[2] / "configs" / "modern.toml",
                       ["--train.micro_batch_size=2", "--train.global_batch_size=2", "--model.seq_len=32",
                        "--model.vocab_size=512", "--model.hidden=64", "--model.ffn_hidden=176", "--model.n_layers=2",
                        "--train.peak_flops=1e12", f"--train.out={tmp_path}",
                        "--train.device=cpu"])
    assert (cfg.model.position, cfg.model.norm, cfg.model.mlp, cfg.model.qk_norm) == ("rope", "rmsnorm", "swiglu", True)
    assert (cfg.train.optimizer, cfg.train.lr_schedule, cfg.model.tie_embeddings) == ("muon", "wsd", False)
    trainer = make_trainer(cfg)
    assert isinstance(trainer.optimizer, MuonAdamW)
    assert math.isfinite(trainer.train_step().loss)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_planner_counts_muons_state(family: str) -> None:
    """``mtnlg plan --optimizer muon``'s optimizer bytes are what a Muon step allocates (one momentum per
    block-matrix element, AdamW's two moments elsewhere), for a GPT and a Llama-style model."""
    extra = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
                 n_kv_heads=2) if family == "llama" else {}
    model_cfg = ModelConfig(vocab_size=128, seq_len=16, n_layers=2, hidden=32, n_heads=4, padded_vocab_multiple=64,
                            **extra)
    cfg = Config(model=model_cfg, train=TrainConfig(optimizer="muon", device="cpu")).validate()
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.train)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    measured = sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items() if k != "step")
    planned = rank_state(model_cfg, Layout(gpus=1, dp=1, precision="fp32", optimizer="muon"), 0)
    assert planned["optimizer_bytes"] == measured
    adamw = rank_state(model_cfg, Layout(gpus=1, dp=1, precision="fp32"), 0)
    assert adamw["optimizer_bytes"] > measured
