"""Where the MoE layer's time goes, by part, against the dense MLP of the same active FLOPs.

``tiny-moe``'s MoE block (8 experts of width 512, top-2, on B x T = 8 x 256 tokens of width 256) and
``tiny``'s dense MLP (width 1024) run forward + backward on the same input, alternating in rounds so
that both see the same machine load. Both MoE layouts are timed: ``padded`` (the CPU default: one
batched matmul per Linear over an (E, W, C) block, gathers both ways) and ``sorted`` (rows sorted by
expert through ``torch._grouped_mm``, a loop of per-expert GEMMs on the CPU, and an ``index_add``
to combine). torch.profiler then splits each MoE layout's time into router (gate matmul, scores,
top-k), permutation (sort, gathers, un-permutation and their backwards), expert GEMMs, activation,
aux losses (balance and z-loss), and the rest. The kernel path is the one ATen picked
(``torch.backends.cpu.get_cpu_capability()``, recorded; force AVX2 on an AVX-512 host with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``).

    .venv/bin/python benchmarks/moe_layer.py [--rounds 7] [--threads 2 1] [--out results/moe_layer.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from run_info import run_info
from torch.profiler import ProfilerActivity, profile

from mtnlg.config.presets import get_preset
from mtnlg.model.gpt import MLP
from mtnlg.model.moe import MoE

# Profiler event name fragments -> part (first match wins; forward and autograd backward names alike).
PARTS = (
    ("router", ("gate", "softmax", "topk", "sigmoid", "gather", "SoftmaxBackward", "TopkBackward")),
    ("aux losses", ("logsumexp", "LogsumexpBackward", "square", "PowBackward", "MeanBackward")),
    ("permutation", ("sort", "bincount", "cumsum", "index", "_Gather", "cat", "IndexBackward", "IndexAddBackward",
                     "scatter", "repeat_interleave", "full", "arange", "remainder", "clamp")),
    ("expert GEMMs", ("bmm", "baddbmm", "grouped_mm", "aten::mm", "addmm", "BmmBackward", "BaddbmmBackward",
                      "GroupedMmBackward", "MmBackward", "AddmmBackward", "linear")),
    ("activation", ("gelu", "silu", "GeluBackward", "SiluBackward")),
)


def part_of(name: str) -> str:
    for part, keys in PARTS:
        if any(key.lower() in name.lower() for key in keys):
            return part
    return "other (gating products, sums, copies)"


def layers() -> dict[str, tuple[torch.nn.Module, Callable[[torch.nn.Module], None]]]:
    torch.manual_seed(0)
    dense = MLP(get_preset("tiny"))
    moe = MoE(get_preset("tiny-moe"))
    moe.reset_parameters(lambda key: torch.Generator().manual_seed(len(key)), 0.02, 0.02 / 2)
    torch.nn.init.normal_(moe.router.gate.weight, 0.0, 0.02)
    return {"dense MLP": dense, "MoE padded": moe, "MoE sorted": moe}


def step_fn(name: str, layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    grad = torch.randn_like(x)

    def step() -> None:
        if isinstance(layer, MoE):
            layer._padded = lambda: name.endswith("padded")  # type: ignore[method-assign]
        out = layer(x)
        aux = layer.take_aux_loss() if isinstance(layer, MoE) else None
        torch.autograd.backward([out, aux] if aux is not None else [out],
                                [grad, torch.ones(())] if aux is not None else [grad])
        layer.zero_grad(set_to_none=True)

    return step


def profile_parts(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each part."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    parts: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith(("ProfilerStep", "autograd::engine")):
            continue
        parts[part_of(event.key)] += event.self_cpu_time_total / 1e3 / steps
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def measure(threads: int, rounds: int, n: int) -> dict:
    """Alternating timings and the profile by part, at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    x = torch.randn(8, 256, 256, requires_grad=True)
    steps = {name: step_fn(name, layer, x) for name, layer in layers().items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(rounds):  # alternate: every layer sees the same load
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(n):
                step()
            times[name].append((time.perf_counter() - start) / n * 1e3)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "forward_backward_ms_median": median, "forward_backward_ms_all": times,
        "dense_over_moe_time": {name: median["dense MLP"] / median[name] for name in median if name != "dense MLP"},
        "parts_ms_per_step": {name: profile_parts(steps[name], n) for name in ("MoE padded", "MoE sorted")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps of each layer per round")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer.json"))
    args = parser.parse_args()
    load = os.getloadavg()
    record = {
        "benchmark": "moe_layer", "tokens": 8 * 256, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(default)"),
        "threads": {str(t): measure(t, args.rounds, args.steps) for t in args.threads}, "run": run_info(load),
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for t, r in record["threads"].items():
        print(f"{t} threads:", json.dumps({k: r[k] for k in ("forward_backward_ms_median", "dense_over_moe_time",
                                                             "parts_ms_per_step")}, indent=2))


if __name__ == "__main__":
    main()
