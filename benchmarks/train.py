"""Training throughput and MFU: mtnlg's trainer vs Hugging Face ``GPT2LMHeadModel`` and nanoGPT's model.

HF's model runs with a plain AdamW loop, nanoGPT's (``nanogpt_peer.py``) with its own optimizer setup.
All train gpt2-small (124M parameters, dropout 0) on batches of B=4 sequences of T=256 tokens in
fp32 on the CPU with the same thread count. To be fair on a shared, noisy machine the loops alternate:
every round times a few steps of each, and the medians of the step times are compared. Two comparisons:

* as shipped: each loop in its own process, as a user runs it: ``mtnlg train`` tunes glibc to keep
  freed memory (``reuse_freed_cpu_memory``), a plain HF script runs with glibc's defaults;
* same process: both loops in this process, both with the tuned allocator, which isolates the code.

MFU is (6N + attention) FLOPs per token (``mtnlg.model.counts.flops_per_token``) times tokens/s over the fp32
matmul peak measured in the same run (2048^3 matmuls: the median of four samples, each the best of
seven runs). Ablations, each a baseline timed alternately with a variant, show what the choices
contribute: the fused AdamW kernel (vs foreach), ``torch.compile`` of the blocks, bf16/fp16 autocast
(to pick the CPU default dtype), SDPA (HF's sdpa vs eager attention), the allocator setting, and a
chunked (fused linear + cross-entropy) loss head for the 50k vocabulary.

    .venv/bin/python benchmarks/train.py [--rounds 4] [--steps 2] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nanogpt_peer import nanogpt_step
from run_info import run_info

from mtnlg.config import Config, ModelConfig, TrainConfig
from mtnlg.config.presets import get_preset
from mtnlg.model.counts import flops_per_token
from mtnlg.train.build import build_model
from mtnlg.train.metrics import measure_matmul_flops
from mtnlg.train.run import reuse_freed_cpu_memory
from mtnlg.train.trainer import Trainer

Step = Callable[[], None]
# Untimed steps per loop: the first steps page-fault the heap up to its peak (optimizer state,
# gradients, then fragmentation: 380k, 220k and 85k minor faults in steps 1-3 of gpt2-small here,
# none after), which is start-up, not throughput.
WARMUP = 3


class RandomTokens:
    """Random token samples (seq_len + 1 each): throughput does not depend on the text."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.data = np.random.default_rng(0).integers(0, vocab, size=(n, seq_len + 1), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[i]


def make_trainer(model_cfg: ModelConfig, batch: int, out: Path, **train: object) -> Trainer:
    tc = TrainConfig(micro_batch_size=batch, global_batch_size=batch, steps=10**6, warmup_steps=10,
                     peak_flops=1.0, out=str(out), device="cpu", **train)
    cfg = Config(model=model_cfg, train=tc).validate()
    data = RandomTokens(64, model_cfg.seq_len, model_cfg.vocab_size)
    return Trainer(cfg, build_model(cfg, torch.device("cpu")), data, progress=False)


def mtnlg_step(model_cfg: ModelConfig, batch: int, out: Path, foreach: bool = False, **train: object) -> Step:
    """One optimizer step of the real Trainer (accumulation, clipping, NaN check, schedule included).

    ``foreach`` swaps the fused AdamW kernel for torch's multi-tensor implementation.
    """
    trainer = make_trainer(model_cfg, batch, out, **train)
    if foreach:
        for group in trainer.optimizer.param_groups:
            group["fused"], group["foreach"] = False, True

    def step() -> None:
        trainer.train_step()

    return step


def hf_step(model_cfg: ModelConfig, batch: int, attention: str = "sdpa") -> Step:
    """HF GPT2LMHeadModel, same shape, dropout 0, with the textbook loop: loss.backward(); AdamW step."""
    import transformers

    hf_cfg = transformers.GPT2Config(
        vocab_size=model_cfg.vocab_size, n_positions=model_cfg.seq_len, n_embd=model_cfg.hidden,
        n_layer=model_cfg.n_layers, n_head=model_cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_cfg).train()
    assert model.config._attn_implementation == attention
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.from_numpy(RandomTokens(batch, model_cfg.seq_len - 1, model_cfg.vocab_size).data)

    def step() -> None:
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Output layer + cross-entropy per chunk of rows; gradients computed in forward (Liger-style).

    Never holds the (N, V) logits: memory O(chunk x V). Measured here only, to decide whether mtnlg
    should use it on CPU.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int) -> torch.Tensor:  # noqa: ANN001
        grad_h, grad_w, total = torch.empty_like(h), torch.zeros_like(w), h.new_zeros(())
        for s in range(0, h.shape[0], chunk):
            hs, ts = h[s:s + chunk], t[s:s + chunk]
            logits = hs @ w.t()  # (chunk, V)
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, ts[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(ts)), ts] -= 1  # d(loss)/d(logits) = softmax - one_hot
            grad_h[s:s + chunk] = probs @ w
            grad_w.addmm_(probs.t(), hs)
        n = h.shape[0]
        ctx.save_for_backward(grad_h / n, grad_w / n)
        return total / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, grad_w * grad, None, None


def head_steps(model_cfg: ModelConfig, tokens: int) -> dict[str, Step]:
    """Forward + backward of the output layer and loss alone: plain full logits vs chunked."""
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(tokens, model_cfg.hidden, generator=gen)
    w0 = torch.randn(model_cfg.padded_vocab_size, model_cfg.hidden, generator=gen) * 0.02
    t = torch.randint(0, model_cfg.vocab_size, (tokens,), generator=gen)

    def plain() -> None:
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        F.cross_entropy((h @ w.t()).float(), t).backward()

    def chunked(chunk: int) -> Step:
        def run() -> None:
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            ChunkedLinearCrossEntropy.apply(h, w, t, chunk).backward()
        return run

    return {"plain_full_logits": plain, "chunked_256": chunked(256), "chunked_512": chunked(512)}


def timed(step: Step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def alternate(steps: dict[str, Step], rounds: int, n: int) -> dict[str, float]:
    """Median seconds per step of each, measured in interleaved rounds so load changes hit all alike."""
    for step in steps.values():
        timed(step, WARMUP)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name] += timed(step, n)
    return {name: statistics.median(s) for name, s in samples.items()}


def ab(make_base: Callable[[], Step], make_variant: Callable[[], Step], rounds: int, n: int) -> dict[str, float]:
    """Median step seconds of a baseline and a variant timed alternately; the variant's first step apart."""
    base = make_base()
    start = time.perf_counter()
    variant = make_variant()
    variant()  # the first step includes compilation for `compile`
    first = time.perf_counter() - start
    medians = alternate({"base": base, "variant": variant}, rounds, n)
    del base, variant
    gc.collect()
    return {"base_step_seconds": medians["base"], "variant_step_seconds": medians["variant"],
            "variant_speedup": medians["base"] / medians["variant"], "variant_first_step_seconds": first}


class Worker:
    """A loop in its own process, stepped on request: loops alternate without sharing a heap or its settings."""

    def __init__(self, kind: str, args: argparse.Namespace, default_allocator: bool) -> None:
        cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--batch",
               str(args.batch), "--seq-len", str(args.seq_len)]
        cmd += ["--default-allocator"] if default_allocator else []
        cmd += ["--quick"] if args.quick else []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")  # built and warmed up

    def _expect(self, word: str) -> None:
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"benchmark worker said {line!r} instead of {word!r} (exit code {self.proc.poll()})")

    def __call__(self) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        self._expect("done")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run_worker(args: argparse.Namespace, model_cfg: ModelConfig) -> None:
    """The child side of ``Worker``: build one loop, then one step per line read."""
    if args.worker == "hf":
        step = hf_step(dataclasses.replace(model_cfg, padded_vocab_multiple=1), args.batch)
    elif args.worker == "nanogpt":
        step = nano(model_cfg, args.batch)
    else:
        step = mtnlg_step(model_cfg, args.batch, Path(tempfile.mkdtemp(prefix="mtnlg-bench-")))
    step()
    print("ready", flush=True)
    for _ in sys.stdin:
        step()
        print("done", flush=True)


def in_workers(kinds: dict[str, tuple[str, bool]], args: argparse.Namespace) -> dict[str, float]:
    """Median step seconds of loops in separate processes ({name: (kind, default_allocator)}), alternating."""
    workers = {name: Worker(kind, args, default_allocator) for name, (kind, default_allocator) in kinds.items()}
    try:
        return alternate(workers, args.rounds, args.steps)
    finally:
        for worker in workers.values():
            worker.close()


def nano(model_cfg: ModelConfig, batch: int) -> Step:
    """nanoGPT's loop at the benchmark's shape."""
    c = model_cfg
    return nanogpt_step(c.vocab_size, c.seq_len, c.n_layers, c.hidden, c.n_heads, batch)


def model_config(args: argparse.Namespace) -> ModelConfig:
    cfg = dataclasses.replace(get_preset("gpt2-small"), seq_len=args.seq_len)
    return dataclasses.replace(cfg, n_layers=2) if args.quick else cfg


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved measurement rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per loop per round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the CI machine has 2 cores)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, one round: checks the script runs")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="ablations to skip: fused_adamw compile bf16 fp16 sdpa allocator loss_head")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    parser.add_argument("--worker", choices=["hf", "mtnlg", "nanogpt"], help=argparse.SUPPRESS)  # a Worker's child
    parser.add_argument("--default-allocator", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 1
    return args


def ablations(args: argparse.Namespace, model_cfg: ModelConfig, tmp: Path) -> dict[str, dict[str, float]]:
    """What each choice contributes; run in this process, with the tuned allocator."""
    def mtnlg(**kwargs: object) -> Callable[[], Step]:
        return lambda: mtnlg_step(model_cfg, args.batch, tmp / "v", **kwargs)

    hf_cfg = dataclasses.replace(model_cfg, padded_vocab_multiple=1)
    pairs = {  # (baseline, variant): each row says what the baseline gains over the variant
        "fused_adamw": (mtnlg(), mtnlg(foreach=True)),
        "compile": (mtnlg(), mtnlg(compile=True)),
        "bf16": (mtnlg(), mtnlg(precision="bf16")),
        "fp16": (mtnlg(), mtnlg(precision="fp16")),
        "sdpa": (lambda: hf_step(hf_cfg, args.batch), lambda: hf_step(hf_cfg, args.batch, "eager")),
    }
    out = {name: ab(base, variant, max(1, args.rounds - 1), args.steps)
           for name, (base, variant) in pairs.items() if name not in args.skip}
    if "allocator" not in args.skip:
        medians = in_workers({"tuned": ("mtnlg", False), "default": ("mtnlg", True)}, args)
        out["allocator"] = {"reuse_freed_memory_step_seconds": medians["tuned"],
                            "glibc_default_step_seconds": medians["default"],
                            "speedup": medians["default"] / medians["tuned"]}
    if "loss_head" not in args.skip:
        tokens = args.batch * args.seq_len
        out["loss_head"] = {f"{k}_seconds": v for k, v in
                            alternate(head_steps(model_cfg, tokens), args.rounds, args.steps).items()}
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not args.default_allocator:
        reuse_freed_cpu_memory()  # what `mtnlg train` does on a CPU
    model_cfg = model_config(args)
    if args.worker:
        run_worker(args, model_cfg)
        return
    load_start = os.getloadavg()
    peaks = [measure_matmul_flops(torch.device("cpu")) for _ in range(3)]
    hf_cfg = dataclasses.replace(model_cfg, padded_vocab_multiple=1)  # HF does not pad the vocabulary
    tmp = Path(tempfile.mkdtemp(prefix="mtnlg-bench-"))

    def report(medians: dict[str, float]) -> dict[str, object]:
        """tokens/s and MFU (against the median peak sample: one boosted sample is no sustained peak)."""
        rows = {}
        for name, cfg in (("hf", hf_cfg), ("nanogpt", model_cfg), ("mtnlg", model_cfg)):
            tps = args.batch * args.seq_len / medians[name]
            flops = tps * flops_per_token(cfg, args.seq_len)["train"]
            rows[name] = {"step_seconds": medians[name], "tokens_per_s": tps, "mfu": flops / statistics.median(peaks),
                          "mfu_vs_best_peak_sample": flops / max(peaks)}
        return {**rows, "speedup": rows["mtnlg"]["tokens_per_s"] / rows["hf"]["tokens_per_s"],
                "speedup_vs_nanogpt": rows["mtnlg"]["tokens_per_s"] / rows["nanogpt"]["tokens_per_s"]}

    shipped = report(in_workers({"hf": ("hf", True), "nanogpt": ("nanogpt", True), "mtnlg": ("mtnlg", False)},
                                args))
    same = report(alternate({"hf": hf_step(hf_cfg, args.batch), "nanogpt": nano(model_cfg, args.batch),
                             "mtnlg": mtnlg_step(model_cfg, args.batch, tmp)}, args.rounds, args.steps))
    gc.collect()
    peaks.append(measure_matmul_flops(torch.device("cpu")))
    results = {"as_shipped_separate_processes": shipped, "same_process_both_tuned_allocator": same}
    write_results(args, results, ablations(args, model_cfg, tmp), peaks, load_start)


def write_results(args: argparse.Namespace, results: dict, ablations: dict, peaks: list[float],
                  load_start: tuple[float, ...]) -> None:
    out = {
        "benchmark": "train", "model": "gpt2-small" + (" (2 layers, --quick)" if args.quick else ""),
        "batch": args.batch, "seq_len": args.seq_len, "dtype": "fp32", "threads": args.threads,
        "peak_fp32_matmul_flops": statistics.median(peaks), "peak_samples": peaks,
        "results": results,
        "targets": {"speedup_vs_hf": 1.2, "speedup_vs_nanogpt": 1.1, "met": {
            name: {"vs_hf": r["speedup"] >= 1.2, "vs_nanogpt": r["speedup_vs_nanogpt"] >= 1.1}
            for name, r in results.items()}},
        "ablations": ablations,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": sys.version.split()[0],
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "run": run_info(load_start),
        "method": (f"{args.rounds} interleaved rounds x {args.steps} steps per loop, medians; ablations "
                   f"{max(1, args.rounds - 1)} rounds, baseline and variant alternating"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
