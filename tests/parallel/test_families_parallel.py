"""A Llama-family model (``--preset llama-tiny``: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied,
no biases; here with Qwen 3's QK-norm too) as `mtnlg train` jobs of 2 ranks, tp=2 (with and without sequence
parallelism), pp=2, dp=2 (FSDP) and cp=2 (ring attention) against one process, and its tp=2 checkpoint
exported to Hugging Face.

One shared set of runs, cut to test size, each on 2 gloo ranks forked as ``torchrun`` would start
them (``cli_world``: no torch import per rank).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtnlg.checkpoint.convert import to_hf
from mtnlg.checkpoint.model import load_model
from mtnlg.cli import main
from tests.harness.cli import cli_world, losses, small_run_flags

RTOL = 1e-5
STEPS = 4
TRAIN = [*small_run_flags(n_layers=2, micro_batch_size=2, eval_iters=1), "--preset", "llama-tiny",
         "--model.qk_norm=true", f"--train.steps={STEPS}"]
LAYOUTS = {"tp2": ["--parallel.tp=2"], "tp2-sp": ["--parallel.tp=2", "--parallel.sequence_parallel=true"],
           "pp2": ["--parallel.pp=2"], "dp2": [], "cp2": ["--parallel.cp=2"]}


@pytest.fixture(scope="module")
def runs(train_data_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-runs")
    assert main(["train", *train_data_flags, *TRAIN, "--out", str(root / "single")]) == 0
    for name, flags in LAYOUTS.items():
        cli_world(["train", *train_data_flags, *TRAIN, *flags, "--out", str(root / name)])
    return {name: root / name for name in ("single", *LAYOUTS)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_llama_tiny_logs_the_single_process_losses(runs: dict[str, Path], layout: str) -> None:
    single, got = losses(runs["single"]), losses(runs[layout])
    assert sorted(got) == sorted(single) == list(range(1, STEPS + 1))
    assert [got[s] for s in single] == pytest.approx([single[s] for s in single], rel=RTOL)
    assert single[STEPS] < single[1]


def test_tp2_checkpoint_exports_to_transformers(runs: dict[str, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, cfg, _ = load_model(runs["tp2"])
    assert (cfg.model.position, cfg.model.mlp, cfg.model.kv_heads, cfg.model.qk_norm) == ("rope", "swiglu", 2, True)
    to_hf(runs["tp2"], tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"  # QK-norm makes it Qwen 3-style
    idx = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[..., : cfg.model.vocab_size]).abs().max() < 1e-5


def test_tp_must_divide_the_kv_heads() -> None:
    from mtnlg.config import ConfigError
    from mtnlg.config.presets import get_preset
    from mtnlg.parallel.tensor import check_tp_compatible

    check_tp_compatible(get_preset("llama-tiny"), 2)
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=2 is not divisible by parallel.tp=4"):
        check_tp_compatible(get_preset("llama-tiny"), 4)
