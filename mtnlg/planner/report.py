"""``mtnlg plan``: the command's arguments turned into a plan or a search, and their text rendering."""

from __future__ import annotations

import argparse
import json

from mtnlg.config import ConfigError, ModelConfig
from mtnlg.config.schedules import SCHEDULES
from mtnlg.planner import Layout, Plan, make_layout, plan, plan_auto, resolve_gpu
from mtnlg.planner.memory import rank_state
from mtnlg.planner.search import search
from mtnlg.util.fmt import human


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The cluster, layout and budget flags (the model comes from --preset/--config/overrides)."""
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster")
    p.add_argument("--gpu", help="a100-40gb, a100-80gb, h100-80gb or h200 (published specs)")
    p.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s of one GPU (replaces the table's)")
    p.add_argument("--memory-gb", type=float, help="memory of one GPU in GiB")
    p.add_argument("--hbm-gbps", type=float, help="memory bandwidth of one GPU in GB/s")
    p.add_argument("--nvlink-gbps", type=float, help="NVLink bandwidth per GPU and direction in GB/s")
    p.add_argument("--network-gbps", type=float, help="network bandwidth per GPU in GB/s")
    p.add_argument("--gpus-per-node", type=int, help="GPUs sharing NVLink (default 8)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default 1; --search: varied)")
    p.add_argument("--pp", type=int, help="pipeline-parallel size (default 1; --search: varied)")
    p.add_argument("--cp", type=int, help="context-parallel size: each sequence split over cp ranks (parallel.cp; "
                   "default 1; --search: varied)")
    p.add_argument("--dp", type=int, help="data-parallel size (default gpus / (tp * cp * pp))")
    p.add_argument("--pp-stages-per-rank", "--virtual-stages", dest="virtual_stages", type=int,
                   help="parallel.pp_stages_per_rank: pipeline stages per rank (> 1: interleaved 1F1B)")
    p.add_argument("--pp-schedule", choices=list(SCHEDULES),
                   help="parallel.pp_schedule (default 1f1b, interleaved_1f1b with several stages per rank)")
    p.add_argument("--micro-batch-size", "--micro-batch", dest="micro_batch", type=int,
                   help="train.micro_batch_size: sequences per micro-batch (default 1)")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3],
                   help="ZeRO sharding over dp: 0 none (default), 1 optimizer, 2 + gradients, 3 FSDP (parallel.zero)")
    p.add_argument("--rank", type=int, help="also this rank's stage, layers and bytes (as `train --dry-run` reports)")
    p.add_argument("--recompute", choices=["auto", "none", "selective", "full"],
                   help="activation recomputation; auto (default): the least that fits")
    p.add_argument("--sequence-parallel", action="store_true", default=None, help="shard activations over tp")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="training precision")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: one momentum for the blocks' matrices instead of AdamW's two moments (train.optimizer)")
    p.add_argument("--flash-attention", action="store_true", help="fused attention (no s^2 scores kept)")
    p.add_argument("--tokens", type=float, default=0.0, help="training tokens (default 20 per parameter)")
    p.add_argument("--search", action="store_true", help="rank the layouts that fit by predicted step time")
    p.add_argument("--top", type=int, default=10, help="--search: layouts to show")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace, cfg: ModelConfig, model_flags: list[str] | None = None) -> str:
    """The command's output for parsed ``args`` and the model ``cfg`` (given by ``model_flags``: they
    start the printed ``mtnlg train`` commands)."""
    model_flags = model_flags or []
    gpu = resolve_gpu(args.gpu, peak_tflops=args.peak_tflops, memory_gb=args.memory_gb, hbm_gbps=args.hbm_gbps,
                      nvlink_gbps=args.nvlink_gbps, network_gbps=args.network_gbps,
                      gpus_per_node=args.gpus_per_node, single=args.gpus == 1)
    common = {"precision": args.precision, "flash_attention": args.flash_attention, "optimizer": args.optimizer}
    if args.search:
        fixed = {"tp": args.tp, "pp": args.pp, "dp": args.dp, "cp": args.cp, "micro_batch": args.micro_batch,
                 "virtual_stages": args.virtual_stages, "zero": args.zero, "sequence_parallel": args.sequence_parallel,
                 "recompute": None if args.recompute in (None, "auto") else args.recompute,
                 "schedule": args.pp_schedule}
        plans = search(cfg, gpu, args.gpus, args.global_batch, fixed=fixed, top=args.top, tokens=args.tokens, **common)
        if args.json:
            return json.dumps([_with_command(p, model_flags) for p in plans], indent=2)
        return render_search(plans, model_flags)
    v = args.virtual_stages or 1
    layout = make_layout(args.gpus, args.tp or 1, args.pp or 1, args.dp or 0, args.cp or 1,
                         micro_batch=args.micro_batch or 1,
                         global_batch=args.global_batch, virtual_stages=v, zero=args.zero or 0,
                         recompute="none" if args.recompute in (None, "auto") else args.recompute,
                         sequence_parallel=bool(args.sequence_parallel),
                         schedule=args.pp_schedule or ("interleaved_1f1b" if v > 1 else "1f1b"), **common)
    if args.recompute in (None, "auto"):
        result = plan_auto(cfg, layout, gpu, tokens=args.tokens)
    else:
        result = plan(cfg, layout, gpu, tokens=args.tokens)
    rank = rank_state(cfg, result.layout, args.rank) if args.rank is not None else None
    if args.json:
        return json.dumps(_with_command(result, model_flags) | (rank or {}), indent=2)
    return render(result, model_flags) + (_rank_text(rank) if rank else "")


def train_flags(lay: Layout) -> list[str]:
    """``mtnlg train`` flags that run ``lay`` (the config's names for the planner's knobs).

    ZeRO 0 (nothing sharded) is FSDP over one rank per replica (``dp_shard=1``, DDP-like); the recomputation
    level is ``model.recompute``.
    """
    flags = [f"--parallel.tp={lay.tp}", f"--parallel.pp={lay.pp}", f"--parallel.dp={lay.dp}"]
    flags += [f"--parallel.cp={lay.cp}"] if lay.cp > 1 else []
    if lay.dp > 1:
        flags.append(f"--parallel.zero={lay.zero or 3}")
        if lay.zero == 0:
            flags += [f"--parallel.dp_replicate={lay.dp}", "--parallel.dp_shard=1"]
    if lay.pp > 1:
        flags += [f"--parallel.pp_schedule={lay.schedule}", f"--parallel.pp_stages_per_rank={lay.virtual_stages}"]
    if lay.sequence_parallel:
        flags.append("--parallel.sequence_parallel=true")
    if lay.recompute != "none":
        flags.append(f"--model.recompute={lay.recompute}")
    if lay.optimizer != "adamw":
        flags.append(f"--train.optimizer={lay.optimizer}")
    return flags + [f"--train.micro_batch_size={lay.micro_batch}", f"--train.global_batch_size={lay.global_batch}",
                    f"--train.precision={lay.precision}"]


def train_command(p: Plan, model_flags: list[str]) -> str | None:
    """The ``torchrun ... mtnlg train`` line of a plan's layout (None if mtnlg cannot run it)."""
    try:
        flags = train_flags(p.layout)
    except ConfigError:
        return None
    per_node = min(p.gpu.gpus_per_node, p.layout.gpus)
    nodes = -(-p.layout.gpus // per_node)
    launch = f"torchrun --nproc_per_node={per_node}" + (
        f" --nnodes={nodes} --node-rank=$NODE_RANK --rdzv-endpoint=$MASTER_ADDR:29500" if nodes > 1 else "")
    return " ".join([launch, "-m mtnlg train", *model_flags, *flags])


def _with_command(p: Plan, model_flags: list[str]) -> dict[str, object]:
    command = train_command(p, model_flags)
    flags = train_flags(p.layout) if command else None
    return p.to_dict() | {"train_flags": flags, "train_command": command}


def _rank_text(rank: dict[str, object]) -> str:
    gib = float(1 << 30)
    layers = rank["layers"]
    return (f"\nrank {rank['rank']}          stage {rank['stage']} (layers {layers[0]}-{layers[1]}): "  # type: ignore[index]
            f"weights {rank['parameter_bytes'] / gib:.2f} GiB, gradients {rank['gradient_bytes'] / gib:.2f} GiB, "  # type: ignore[operator]
            f"optimizer {rank['optimizer_bytes'] / gib:.2f} GiB")  # type: ignore[operator]


def _layout_text(p: Plan) -> str:
    lay = p.layout
    extras = [f"v={lay.virtual_stages}"] if lay.virtual_stages > 1 else []
    extras += [lay.schedule] if lay.pp > 1 and lay.schedule not in ("1f1b", "interleaved_1f1b") else []
    extras += [f"zero={lay.zero}"] if lay.zero else []
    extras += ["sp"] if lay.sequence_parallel else []
    cp = f" cp={lay.cp}" if lay.cp > 1 else ""
    return " ".join([f"tp={lay.tp}{cp} pp={lay.pp} dp={lay.dp} mb={lay.micro_batch}", *extras,
                     f"recompute={lay.recompute}"])


def render(p: Plan, model_flags: list[str] | None = None) -> str:
    """The human-readable plan."""
    lay, mem, t, gib = p.layout, p.memory.gib(), p.time, p.gpu.memory_bytes / (1 << 30)
    lines = [
        f"cluster          {lay.gpus} x {p.gpu.name} ({p.gpu.peak_flops / 1e12:.3g} TFLOP/s, {gib:.0f} GiB)",
        f"layout           {_layout_text(p)}; {lay.microbatches} micro-batches of {lay.global_batch} sequences",
        f"parameters       {human(p.parameters)}; FLOPs/token {human(p.model_flops_per_token)} "
        f"(+ recomputation: {human(p.hardware_flops_per_token)})",
        f"memory per GPU   {mem['total']:.1f} GiB of {gib:.0f}: weights {mem['weights']:.1f}, gradients "
        f"{mem['gradients']:.1f}, optimizer {mem['optimizer']:.1f}, activations {mem['activations']:.1f}"
        + (f", gathered weights {mem['gathered_weights']:.1f}" if mem["gathered_weights"] else "")
        + f" -> {'fits' if p.fits else 'does NOT fit'}",
        f"step time        {t.step:.2f} s: compute {t.compute:.2f}, bubble {t.bubble:.2f} "
        f"({t.bubble / t.step:.1%}), tp comm {t.tensor_parallel_comm:.2f}, pp comm {t.pipeline_comm:.2f}, "
        f"dp comm {t.data_parallel_comm:.2f}, optimizer {t.optimizer:.2f}"
        + (f", cp comm {t.context_parallel_comm:.2f}" if lay.cp > 1 else ""),
        f"throughput       {human(p.tokens_per_step / t.step)} tokens/s; "
        f"{p.hfu * p.gpu.peak_flops / 1e12:.3g} TFLOP/s per GPU; MFU {p.mfu:.1%} (HFU {p.hfu:.1%})",
        f"training         {human(p.tokens)} tokens in {p.days:.1f} days",
        f"run it           {train_command(p, model_flags or []) or 'not by mtnlg train'}",
    ]
    return "\n".join(lines)


def render_search(plans: list[Plan], model_flags: list[str] | None = None) -> str:
    """A ranked table of the layouts that fit, then the command that runs each."""
    rows = [f"{'#':>2}  {'layout':52s} {'step s':>8s} {'MFU':>6s} {'GiB':>6s} {'days':>8s}"]
    for i, p in enumerate(plans, 1):
        rows.append(f"{i:>2}  {_layout_text(p):52s} {p.time.step:8.2f} {p.mfu:6.1%} "
                    f"{p.memory.total / (1 << 30):6.1f} {p.days:8.2f}")
    rows += [f"#{i}: {train_command(p, model_flags or [])}" for i, p in enumerate(plans, 1)]
    return "\n".join(rows)
