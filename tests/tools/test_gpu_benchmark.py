"""benchmarks/gpu.py runs only on a CUDA machine; here: it imports, its peak table and its CPU exit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu  # noqa: E402


def test_peak_is_looked_up_by_device_name_or_given() -> None:
    assert gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_flops("Some GPU", override_tflops=100) == 100e12
    with pytest.raises(SystemExit, match="--peak-tflops"):
        gpu.peak_flops("Some GPU")


@pytest.mark.skipif(gpu.torch.cuda.is_available(), reason="a CUDA machine runs the benchmark itself")
def test_without_cuda_it_measures_nothing_and_writes_nothing(tmp_path: Path, capsys) -> None:
    assert gpu.main(["--out", str(tmp_path / "gpu.json")]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "gpu.json").exists()


def test_random_tokens_have_the_sample_shape() -> None:
    data = gpu.RandomTokens(4, seq_len=16, vocab=100)
    assert len(data) == 4 and data[0].shape == (17,) and data[0].max() < 100


def test_the_zero_comparison_trains_each_stage_on_the_same_batches(tmp_path: Path) -> None:
    one, three = (gpu.zero_config("gpt3-1.3b", zero, 8, tmp_path) for zero in (1, 3))
    assert (one.parallel.zero, three.parallel.zero) == (1, 3)
    assert one.train.global_batch_size == three.train.global_batch_size == 8 * 8 * gpu.ZERO_MICROBATCHES
    assert one.train.precision == "bf16" and one.train.out != three.train.out
    ratios = gpu.compare_zero({1: {"step_seconds": 1.5, "peak_memory_GiB": 30.0},
                               3: {"step_seconds": 2.0, "peak_memory_GiB": 20.0}})
    assert ratios["step_time_zero1_over_zero3"] == 0.75 and ratios["memory_zero1_over_zero3"] == 1.5


def test_the_fp8_comparison_trains_bf16_and_fp8_alike_and_records_a_refusal(tmp_path: Path) -> None:
    bf16, fp8 = (gpu.train_config("gpt2-medium", 989e12, tmp_path, p) for p in ("bf16", "fp8"))
    assert (bf16.train.precision, fp8.train.precision) == ("bf16", "fp8")
    assert bf16.train.micro_batch_size == fp8.train.micro_batch_size and bf16.train.out != fp8.train.out
    ratio = gpu.compare_precisions({"bf16": {"step_seconds": 1.28}, "fp8": {"step_seconds": 1.0}})
    assert ratio["fp8_speedup"] == pytest.approx(1.28)
    refused = gpu.compare_precisions({"bf16": {"step_seconds": 1.0}, "fp8": {"refused": "train.precision=fp8 needs"}})
    assert "fp8_speedup" not in refused and refused["fp8"]["refused"].startswith("train.precision=fp8")
