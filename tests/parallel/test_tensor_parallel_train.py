"""`mtnlg train --parallel.tp=2` on 2 ranks against one process: loss trace, resharded resume.

The runs are shared (the 2-rank jobs run on gloo ranks forked as ``torchrun`` would start them):
one single-process and one tp=2 run of 10 steps (checkpoints at 5 and 10), then each layout
resumes the other's step-5 checkpoint for two steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint.model import load_model
from mtnlg.cli import main
from tests.harness.cli import at_step, cli_world, losses, small_run_flags, valid_losses

RTOL = 1e-4
TRAIN = small_run_flags(n_layers=2, micro_batch_size=4, eval_iters=1)


@pytest.fixture(scope="module")
def runs(train_data_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-runs")
    assert main(["train", *train_data_flags, *TRAIN, "--train.steps=10", "--out", str(root / "single")]) == 0
    cli_world(["train", *train_data_flags, *TRAIN, "--train.steps=10", "--parallel.tp=2", "--out", str(root / "tp2")])
    return {"single": root / "single", "tp2": root / "tp2"}


def test_ten_steps_under_tp2_match_one_process(runs: dict[str, Path]) -> None:
    single, tp2 = losses(runs["single"]), losses(runs["tp2"])
    assert sorted(single) == sorted(tp2) == list(range(1, 11))
    assert [tp2[s] for s in range(1, 11)] == pytest.approx([single[s] for s in range(1, 11)], rel=RTOL)
    assert valid_losses(runs["tp2"]) == pytest.approx(valid_losses(runs["single"]), rel=RTOL)


def test_tp2_run_writes_a_consolidated_checkpoint_one_process_loads(runs: dict[str, Path]) -> None:
    (tp_model, cfg, _), (ref_model, _, _) = load_model(runs["tp2"]), load_model(runs["single"])
    idx = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert tp_model(idx[:, :-1], idx[:, 1:]).item() == pytest.approx(
            ref_model(idx[:, :-1], idx[:, 1:]).item(), rel=RTOL
        )


def test_checkpoints_reshard_between_one_process_and_tp2(
    runs: dict[str, Path], train_data_flags: list[str], tmp_path: Path
) -> None:
    """Each layout resumes the other's step 5 and continues as if uninterrupted.

    Step 6's loss checks the weights and the data position; step 7's, taken after an AdamW
    update from the loaded moments, checks the optimizer state.
    """
    into_tp = at_step(runs["single"], tmp_path / "into_tp")
    resume = ["train", *train_data_flags, *TRAIN, "--train.steps=7", "--resume", "--out"]
    out = cli_world([*resume, str(into_tp), "--parallel.tp=2"])
    assert f"resuming from {into_tp / 'step_00000005'}" in out
    into_single = at_step(runs["tp2"], tmp_path / "into_single")
    assert main([*resume, str(into_single)]) == 0
    for resumed, uninterrupted in ((into_tp, runs["single"]), (into_single, runs["tp2"])):
        got, want = losses(resumed), losses(uninterrupted)
        assert [got[6], got[7]] == pytest.approx([want[6], want[7]], rel=RTOL)


def test_tp2_generate_command_prints_the_single_process_text(runs: dict[str, Path], capsys) -> None:
    """``generate --tp 2`` on 2 ranks on a tp-trained checkpoint: the same seeded sample, printed once."""
    args = ["generate", "--checkpoint", str(runs["tp2"]), "--prompt", "The", "--temperature", "1",
            "--seed", "7", "--max-new-tokens", "24"]  # fmt: skip
    assert main(args) == 0
    single = capsys.readouterr().out
    assert len(set(single.strip())) > 5  # a real continuation, not only newlines
    out = cli_world([*args, "--tp", "2"])
    assert out.count(single) == 1, (single, out)
