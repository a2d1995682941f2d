"""Mixture of experts end to end: `mtnlg train --preset tiny-moe` in one process and under
a 2-rank ``--parallel.ep=2`` job on the embedded corpus, the ep=2 checkpoint generating in one process,
int8 generation, `mtnlg convert --upcycle` and `mtnlg info`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint.model import load_model, save_model
from mtnlg.cli import main
from mtnlg.config import Config, ModelConfig
from mtnlg.generate.load import load_for_inference
from mtnlg.generate.quantize import quantize_checkpoint
from mtnlg.model.gpt import GPT
from tests.harness.cli import cli_world, losses, small_run_flags

# tiny-moe shrunk to seconds: 2 blocks of width 32, the second a MoE block (4 experts, top-2).
TRAIN = [*small_run_flags(n_layers=2, micro_batch_size=2, eval_iters=1), "--preset", "tiny-moe", "--model.hidden=32",
         "--model.moe_experts=4", "--model.moe_ffn_hidden=64", "--train.steps=10", "--train.eval_interval=10",
         "--train.save_interval=10"]


@pytest.fixture(scope="module")
def runs(train_data_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-runs")
    args = ["train", *train_data_flags, *TRAIN, "--out"]
    assert main([*args, str(root / "single")]) == 0
    cli_world([*args, str(root / "ep2"), "--parallel.ep=2"])
    return {"single": root / "single", "ep2": root / "ep2"}


def test_ep2_logs_the_single_process_losses_and_the_loss_falls(runs: dict[str, Path]) -> None:
    single, ep2 = losses(runs["single"]), losses(runs["ep2"])
    assert sorted(single) == sorted(ep2) == list(range(1, 11))
    assert [ep2[s] for s in range(1, 11)] == pytest.approx([single[s] for s in range(1, 11)], rel=1e-5)
    assert single[10] < single[1] - 0.1
    record = [json.loads(line) for line in (runs["ep2"] / "log.jsonl").read_text().splitlines()][-2]
    assert len(record["moe_load"]["blocks.1"]) == 4 and sum(record["moe_load"]["blocks.1"]) == pytest.approx(1, 1e-3)
    assert record["moe_balance_loss"] >= 1.0 - 1e-6 and record["moe_dropped"] == 0  # dropless


def test_ep2_checkpoint_resumes_in_one_process_as_the_single_run_does(
    runs: dict[str, Path], train_data_flags: list[str], tmp_path: Path
) -> None:
    """DCP reshards the expert-parallel training state (experts split over 2 ranks) into one process."""
    got = {}
    for run in ("ep2", "single"):
        shutil.copytree(runs[run], tmp_path / run)
        assert main(["train", *train_data_flags, *TRAIN, "--train.steps=11", "--resume", "--out",
                     str(tmp_path / run)]) == 0
        got[run] = losses(tmp_path / run)
    assert got["ep2"][11] == pytest.approx(got["single"][11], rel=1e-5)


def test_ep2_checkpoint_generates_in_one_process_fp32_and_int8(runs: dict[str, Path], capsys, tmp_path: Path) -> None:
    (ep_model, _, _), (ref_model, _, _) = load_model(runs["ep2"]), load_model(runs["single"])
    ref = dict(ref_model.named_parameters())
    for name, p in ep_model.named_parameters():
        torch.testing.assert_close(p, ref[name], rtol=1e-4, atol=1e-5)
    texts = []
    for run in ("ep2", "single"):
        assert main(["generate", "--checkpoint", str(runs[run]), "--prompt", "The", "--max-new-tokens", "24",
                     "--temperature", "1", "--seed", "7"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(set(texts[0].strip())) > 5  # the same seeded sample, a real one
    int8 = quantize_checkpoint(runs["ep2"], tmp_path / "int8")
    model, _, _ = load_for_inference(int8)
    assert sum(p.numel() for p in model.parameters()) < ref_model.num_parameters() / 2  # experts are int8 buffers
    x = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        got, want = model(x), ref_model(x)
    assert (got - want).norm() / want.norm() < 0.05
    assert main(["generate", "--checkpoint", str(int8), "--prompt", "The", "--max-new-tokens", "8"]) == 0


def test_upcycled_model_first_forward_equals_the_dense_model(tmp_path: Path, capsys) -> None:
    cfg = Config(model=ModelConfig(vocab_size=120, seq_len=16, n_layers=2, hidden=32, n_heads=4,
                                   padded_vocab_multiple=64)).validate()
    torch.manual_seed(0)
    dense = GPT(cfg.model).eval()
    with torch.no_grad():  # non-zero biases, so their copies are checked too
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_model(tmp_path / "dense", dense, cfg)
    assert main(["convert", "--upcycle", str(tmp_path / "dense"), "--upcycle-experts", "4", "--out",
                 str(tmp_path / "moe"), "--model.moe_every=1", "--model.moe_top_k=2"]) == 0
    moe, moe_cfg, _ = load_model(tmp_path / "moe")
    assert moe_cfg.model.moe_experts == 4 and moe_cfg.model.moe_layers == 2
    x = torch.randint(0, 120, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)
    assert main(["convert", "--upcycle", str(tmp_path / "moe"), "--out", str(tmp_path / "again")]) != 0
    assert "already a mixture-of-experts" in capsys.readouterr().err


def test_info_reports_total_and_active_parameters(capsys) -> None:
    assert main(["info", "--preset", "ds-moe-1.3b-128", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 52e9 < info["parameters"] < 53e9  # DeepSpeed-MoE 1.3B+MoE-128: 52B parameters
    assert 1.3e9 < info["active_parameters"] < 1.4e9  # the compute of the 1.3B dense model
    assert main(["info", "--preset", "tiny-moe"]) == 0
    assert "active parameters" in capsys.readouterr().out
