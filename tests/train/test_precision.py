"""Low precision on a CPU that emulates it: a warning that names fp32, and an MFU peak that never reads 0."""

from __future__ import annotations

import pytest
import torch

from mtnlg.cli import main
from mtnlg.train.metrics import measure_matmul_flops, native_matmul, precision_warning
from mtnlg.util.fmt import format_flops

CPU = torch.device("cpu")
NATIVE = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_emulated_precision_warns_and_names_fp32(precision):
    message = precision_warning(CPU, precision)
    if NATIVE[precision]():
        assert message is None  # this CPU has the instructions: nothing to warn about
    else:
        assert message is not None and "--train.precision=fp32 is faster here" in message
        assert f"no native {precision}" in message


def test_fp32_and_gpus_never_warn():
    assert precision_warning(CPU, "fp32") is None
    assert precision_warning(torch.device("cuda"), "bf16") is None and native_matmul(torch.device("cuda"), torch.half)


@pytest.mark.parametrize("flops, text", [(3.3e11, "330 GFLOP/s"), (1e12, "1,000 GFLOP/s"), (1.26e9, "1.26 GFLOP/s"),
                                         (3.2e8, "0.32 GFLOP/s"), (4.5e5, "0.00045 GFLOP/s")])
def test_a_slow_peak_is_printed_with_its_digits(flops, text):
    assert format_flops(flops) == text


def test_the_measured_bf16_peak_is_never_printed_as_zero():
    peak = measure_matmul_flops(CPU, torch.bfloat16)
    assert peak > 0 and format_flops(peak) != "0 GFLOP/s" and not format_flops(peak).startswith("0 ")


@pytest.mark.skipif(NATIVE["bf16"](), reason="this CPU has native bf16 instructions")
def test_bf16_training_on_this_cpu_warns_before_training(tiny_corpus, tmp_path, capsys):
    args = ["train", "--tokenizer", str(tiny_corpus / "tok"), "--data-path", str(tiny_corpus / "data" / "py"),
            "--out", str(tmp_path / "run"), "--no-progress", "--model.seq_len=16", "--model.n_layers=1",
            "--model.hidden=32", "--model.n_heads=2", "--train.micro_batch_size=2", "--train.global_batch_size=2",
            "--train.steps=1", "--train.eval_interval=0", "--train.precision=bf16", "--train.device=cpu"]
    with pytest.warns(UserWarning, match=r"train.precision=bf16: .* --train.precision=fp32 is faster here"):
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "MFU is relative to " in printed and "MFU is relative to 0 GFLOP/s" not in printed
