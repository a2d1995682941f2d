"""GPU benchmark: bf16 training MFU of the real trainer, and decoding speed against HF ``generate``.

Runs only where CUDA is present (elsewhere it says so and exits 0). Two parts, one JSON result:

* training: ``gpt2-medium`` and ``gpt3-1.3b`` trained by mtnlg's ``Trainer`` on one GPU in bf16
  (autocast over fp32 master weights; FSDP2's mixed-precision policy takes over from dp=2 on) with
  ``torch.compile`` of the blocks, random tokens, fused AdamW: median step time over ``--steps``
  after ``--warmup`` steps, tokens/s and MFU = training FLOPs per token (``mtnlg.model.counts``, 6N +
  attention, no recomputation) x tokens/s over the GPU's dense bf16 peak (``PEAK_BF16``, by
  device name; ``--peak-tflops`` overrides). Megatron reports 41-48% MFU for GPT models on A100s.
* decoding: the generation engine against HF ``GPT2LMHeadModel.generate`` on the same bf16
  gpt2-medium weights, greedy, batch 1 and 8, ``--new-tokens`` tokens each: tokens/s and ratio.

``--zero`` instead compares the distributed optimizer with FSDP on the GPUs of one node, under
``torchrun --nproc_per_node=N``: the same bf16 training (``--models``, data parallel over the N
GPUs, 4 micro-batches a step) with ``parallel.zero=1`` and ``=3``: median step time, tokens/s and
peak memory per GPU; rank 0 writes ``results/gpu_zero.json``.

``--fp8`` compares ``train.precision=bf16`` with ``fp8`` (torchao's float8 linears, mtnlg/parallel/fp8.py)
on one GPU: the same training of each of ``--models`` in both, median step time, tokens/s, MFU (both
against the bf16 peak) and the fp8 speed-up; where fp8 is refused (compute capability < 8.9, no
torchao) the refusal is recorded instead. Writes ``results/gpu_fp8.json``.

    python benchmarks/gpu.py [--steps 20] [--warmup 5] [--models gpt2-medium,gpt3-1.3b] [--out FILE]
    python benchmarks/gpu.py --fp8 [--models gpt2-medium]
    torchrun --nproc_per_node=8 benchmarks/gpu.py --zero [--models gpt3-1.3b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from generate import hf_model  # the CPU generation benchmark's HF conversion, reused
from run_info import run_info
from train import RandomTokens  # the CPU training benchmark's random samples, reused

from mtnlg.config import Config, ConfigError, ParallelConfig, TrainConfig
from mtnlg.config.presets import get_preset
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.model.counts import flops_per_token
from mtnlg.model.gpt import GPT
from mtnlg.parallel.dims import destroy_distributed, init_distributed
from mtnlg.train.build import build_model
from mtnlg.train.trainer import Trainer
from mtnlg.util import dist as rank_info

RESULTS = Path(__file__).parent / "results" / "gpu.json"
# Dense (no sparsity) bf16 tensor-core peaks from the vendor's data sheets, FLOP/s, by a substring
# of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
# Micro-batch per model: fills an 80 GB GPU without activation recomputation.
BATCH = {"gpt2-medium": 16, "gpt3-1.3b": 8}


def peak_flops(device_name: str, override_tflops: float | None = None) -> float:
    """The GPU's dense bf16 peak: ``override_tflops`` if given, else from ``PEAK_BF16``."""
    if override_tflops:
        return override_tflops * 1e12
    for key, peak in PEAK_BF16.items():
        if key in device_name:
            return peak
    raise SystemExit(f"unknown GPU {device_name!r}: pass --peak-tflops (its dense bf16 peak)")


def train_config(preset: str, peak: float, workdir: Path, precision: str = "bf16") -> Config:
    """One GPU's training of ``preset`` at ``precision`` (bf16, or fp8: torchao's float8 linears)."""
    batch = BATCH.get(preset, 4)
    tc = TrainConfig(micro_batch_size=batch, global_batch_size=batch, steps=10**6, warmup_steps=10, device="cuda",
                     precision=precision, compile=True, peak_flops=peak, out=str(workdir / f"{preset}-{precision}"))
    return Config(model=get_preset(preset), train=tc).validate()


def train_benchmark(preset: str, steps: int, warmup: int, peak: float, workdir: Path, precision: str = "bf16") -> dict:
    cfg = train_config(preset, peak, workdir, precision)
    model_cfg, batch = cfg.model, cfg.train.micro_batch_size
    trainer = Trainer(cfg, build_model(cfg, torch.device("cuda")), RandomTokens(4096, model_cfg.seq_len,
                                                                                  model_cfg.vocab_size), progress=False)
    start = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    tokens_per_s = batch * model_cfg.seq_len / step
    train_flops = flops_per_token(model_cfg)["train"]
    result = {"micro_batch": batch, "seq_len": model_cfg.seq_len, "warmup_seconds": first, "step_seconds": step,
              "tokens_per_s": tokens_per_s, "mfu": train_flops * tokens_per_s / peak,
              "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30}
    print(f"{preset} {precision}: {tokens_per_s:,.0f} tok/s, MFU {result['mfu']:.1%}, step {step * 1e3:.0f} ms")
    del trainer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


ZERO_MICROBATCHES = 4


def zero_config(preset: str, zero: int, dp: int, workdir: Path) -> Config:
    """bf16 training of ``preset`` over ``dp`` GPUs with ZeRO stage ``zero``, ``ZERO_MICROBATCHES`` micro-batches."""
    model_cfg = get_preset(preset)
    batch = BATCH.get(preset, 4)
    tc = TrainConfig(micro_batch_size=batch, global_batch_size=batch * dp * ZERO_MICROBATCHES, steps=10**6,
                     warmup_steps=10, device="cuda", precision="bf16", compile=True, peak_flops=1e15,
                     out=str(workdir / f"{preset}-zero{zero}"))
    return Config(model=model_cfg, parallel=ParallelConfig(zero=zero), train=tc).validate()


def zero_benchmark(preset: str, zero: int, steps: int, warmup: int, workdir: Path) -> dict:
    """One ZeRO stage's step time and memory on this node (collective: every rank calls it)."""
    dims = init_distributed(ParallelConfig(zero=zero), "cuda")
    cfg = zero_config(preset, zero, dims.dp, workdir)
    data = RandomTokens(4096, cfg.model.seq_len, cfg.model.vocab_size)
    trainer = Trainer(cfg, build_model(cfg, dims.device, dims), data, dims=dims, progress=False)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    result = {"dp": dims.dp, "global_batch": cfg.train.global_batch_size, "step_seconds": step,
              "tokens_per_s": cfg.train.global_batch_size * cfg.model.seq_len / step,
              "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30}
    del trainer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def compare_zero(results: dict[int, dict]) -> dict:
    """zero=1 against zero=3: the ratios of their step times and memory."""
    one, three = results[1], results[3]
    return {"zero1": one, "zero3": three, "step_time_zero1_over_zero3": one["step_seconds"] / three["step_seconds"],
            "memory_zero1_over_zero3": one["peak_memory_GiB"] / three["peak_memory_GiB"]}


def compare_precisions(results: dict[str, dict]) -> dict:
    """fp8 against bf16 of one model: the step-time speed-up (MFU of both against the bf16 peak), or why
    fp8 did not run (``{"refused": message}``)."""
    bf16, fp8 = results["bf16"], results["fp8"]
    if "refused" in fp8:
        return {"bf16": bf16, "fp8": fp8}
    return {"bf16": bf16, "fp8": fp8, "fp8_speedup": bf16["step_seconds"] / fp8["step_seconds"]}


def fp8_benchmark(preset: str, args: argparse.Namespace, peak: float, workdir: Path) -> dict:
    """bf16 then fp8 training of ``preset``; a ConfigError of fp8 (GPU older than 8.9, no torchao) is recorded."""
    results = {"bf16": train_benchmark(preset, args.steps, args.warmup, peak, workdir)}
    try:
        results["fp8"] = train_benchmark(preset, args.steps, args.warmup, peak, workdir, "fp8")
    except ConfigError as exc:
        results["fp8"] = {"refused": str(exc)}
    return compare_precisions(results)


def zero_main(args: argparse.Namespace) -> int:
    """``--zero``: zero=1 and zero=3 of each model on this node's GPUs (under torchrun)."""
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        result = {m: compare_zero({z: zero_benchmark(m, z, args.steps, args.warmup, Path(tmp)) for z in (1, 3)})
                  for m in args.models.split(",")}
    if rank_info.is_main():
        out = args.out if args.out != RESULTS else RESULTS.with_name("gpu_zero.json")
        result = {"gpu": torch.cuda.get_device_name(), "gpus": rank_info.world_size(), **result,
                  "run": run_info(load_start)}
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    destroy_distributed()
    return 0


def decode_benchmark(new_tokens: int, workdir: Path) -> dict:
    model_cfg = get_preset("gpt2-medium")
    torch.manual_seed(0)
    model = GPT(model_cfg).eval()
    hf = hf_model(model, Config(model=model_cfg), workdir).to("cuda", torch.bfloat16)
    engine = Engine(model.to("cuda", torch.bfloat16), max_batch_size=8)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eod=True)
    results = {}
    for batch in (1, 8):
        prompts = torch.randint(0, model_cfg.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
        speeds = {name: _tokens_per_s(fn, prompts) for name, fn in (
            ("mtnlg", lambda ids: sum(len(c.tokens) for c in engine.generate(ids.tolist(), params))),
            ("hf_generate", lambda ids: _hf_new_tokens(hf, ids.to("cuda"), new_tokens)))}
        speeds["ratio"] = speeds["mtnlg"] / speeds["hf_generate"]
        results[f"batch_{batch}"] = speeds
        print(f"decode batch {batch}: mtnlg {speeds['mtnlg']:.0f} tok/s, HF {speeds['hf_generate']:.0f} tok/s")
    return results


def _hf_new_tokens(hf, ids: torch.Tensor, new_tokens: int) -> int:  # noqa: ANN001
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]


def _tokens_per_s(generate: Callable[[torch.Tensor], int], prompts: torch.Tensor) -> float:
    """New tokens per second of the second of two runs (the first warms up kernels and caches)."""
    generate(prompts)
    torch.cuda.synchronize()
    start = time.perf_counter()
    n = generate(prompts)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2-medium,gpt3-1.3b", help="presets to train, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--zero", action="store_true", help="compare parallel.zero=1 and 3 on this node (torchrun)")
    p.add_argument("--fp8", action="store_true", help="compare train.precision=bf16 and fp8 (torchao) of --models")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is visible here, nothing measured")
        return 0
    if args.zero:
        return zero_main(args)
    load_start = os.getloadavg()
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, args.peak_tflops)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.fp8:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"gpu": name, "peak_bf16_flops": peak,
                      **{m: fp8_benchmark(m, args, peak, Path(tmp)) for m in args.models.split(",")},
                      "run": run_info(load_start)}
        out = args.out if args.out != RESULTS else RESULTS.with_name("gpu_fp8.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "gpu": name,
            "peak_bf16_flops": peak,
            "train": {m: train_benchmark(m, args.steps, args.warmup, peak, Path(tmp)) for m in args.models.split(",")},
            "decode_gpt2_medium_bf16": decode_benchmark(args.new_tokens, Path(tmp)),
            "run": run_info(load_start),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
