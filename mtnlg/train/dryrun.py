"""``mtnlg train --dry-run --world-size N --rank R``: one rank of any world, built by the real code on one CPU.

The process joins a world of ``N`` ranks as rank ``R`` through torch's fake process group
(``init_process_group("fake")``: every collective returns at once, nothing is sent), builds the
same ``DeviceMesh``, pipeline split, tensor-parallel plan, expert split, FSDP or ZeRO sharding and
optimizer as ``mtnlg train`` would on that rank (``build_model`` and ``build_optimizer``, with the
model on the meta device: shapes and placements only, no memory), and reports what that rank
holds: its pipeline stages and layers, the bytes of its weights, gradients and optimizer state,
and the collectives of one training step.

Bytes are those of the tensors the real objects hold (the local shards of the DTensors, the
optimizer's state tensors, which the distributed optimizer creates at once and AdamW creates
like its parameters at its first step); gradients are as large as the weights (fp32), except
under zero=2, where each rank keeps the reduced rows it owns. The planner (``mtnlg plan --rank``)
predicts the same three figures from arithmetic alone; the tests hold the two together.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from mtnlg.config import Config, ConfigError
from mtnlg.config.schedules import layer_split, stage_ids
from mtnlg.model.gpt import GPT
from mtnlg.model.moe import MoE
from mtnlg.parallel.context import global_positions, ring_transfers
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.pipeline import microbatches
from mtnlg.parallel.utils import loss_context
from mtnlg.parallel.zero import ZeroAdamW
from mtnlg.train.build import build_model
from mtnlg.train.optim import build_optimizer, validate_batch_sizes

FP32 = 4


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """This process as rank ``rank`` of ``world_size`` over torch's fake process group, torn down after."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process of its own: torch.distributed is already initialized")
    if not 0 <= rank < world_size:
        raise ConfigError(f"--rank {rank} is not a rank of --world-size {world_size} (0 .. {world_size - 1})")
    _clear_dtensor_caches()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _clear_dtensor_caches() -> None:
    """Forget DTensor's cached sharding decisions: they hold the meshes (and process-group names) of an
    earlier world of this process, equal by shape to the new world's, and would send its collectives there."""
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ dispatch's own cache
    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    ShardingPropagator._propagate_tensor_meta_cached.cache_clear()
    _redistribute.clear_redistribute_planner_cache()
    if hasattr(_redistribute._gen_transform_infos, "cache_clear"):
        _redistribute._gen_transform_infos.cache_clear()


def dry_run(cfg: Config, world_size: int, rank: int) -> dict[str, Any]:
    """What rank ``rank`` of a ``world_size``-rank run of ``cfg`` holds and sends in one step."""
    started = time.perf_counter()
    cfg.train.compile = False  # nothing runs
    with fake_world(world_size, rank):
        dims = ParallelDims.from_config(cfg.parallel, world_size, "cpu")
        validate_batch_sizes(cfg.train, dims.dp)
        dims.build_mesh()
        dims.device = torch.device("meta")  # the mesh is the CPU's; the tensors have shapes only
        model = build_model(cfg, dims.device, dims)
        optimizer = build_optimizer(model, cfg.train, dims, cfg.parallel)
        report = _report(cfg, dims, model, optimizer)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _report(cfg: Config, dims: ParallelDims, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    pc = cfg.parallel
    num_stages = dims.pp * pc.pp_stages_per_rank
    split = layer_split(cfg.model.n_layers, num_stages)
    stages = stage_ids(dims.pp_rank, dims.pp, pc.pp_stages_per_rank, pc.pp_schedule) if dims.pp > 1 else [0]
    layers = sorted(layer for s in stages for layer in split[s]) if dims.pp > 1 else list(range(cfg.model.n_layers))
    params = list(model.parameters())
    parameter_bytes = _bytes(iter(params))
    if isinstance(optimizer, ZeroAdamW):
        optimizer_bytes = optimizer.state_bytes()
        gradient_bytes = optimizer_bytes // 2 if optimizer.stage == 2 else parameter_bytes
    else:  # AdamW's two moments, made like each (local) parameter at the first step
        optimizer_bytes, gradient_bytes = 2 * parameter_bytes, parameter_bytes
    zero = pc.zero if dims.dp > 1 else 0
    return {
        "rank": dims.rank, "world_size": dims.world_size,
        "layout": {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "cp": dims.cp, "ep": dims.ep,
                   "dp_replicate": dims.dp_replicate, "zero": zero, "pp_schedule": pc.pp_schedule,
                   "pp_stages_per_rank": pc.pp_stages_per_rank},
        "coordinates": {"pp": dims.pp_rank, "dp": dims.dp_rank, "cp": dims.cp_rank, "tp": dims.tp_rank},
        "stage": stages[0], "stages": stages, "layers": [layers[0], layers[-1]] if layers else [],
        "stage_layers": {str(s): [split[s][0], split[s][-1]] for s in stages} if dims.pp > 1 else {},
        "parameters": sum(_local(p).numel() for p in params),
        "parameter_bytes": parameter_bytes, "gradient_bytes": gradient_bytes, "optimizer_bytes": optimizer_bytes,
        "collectives": _collectives(cfg, dims, model, optimizer, len(layers), stages),
        "activation_bytes": _activation_bytes(cfg, dims, model, [split[s] for s in stages], stages),
    }


def _activation_bytes(cfg: Config, dims: ParallelDims, model: GPT, splits: list[range],
                      stages: list[int]) -> int | None:
    """Bytes autograd saves for backward in one micro-batch's forward through this rank's stages (local
    shards), measured by running the real forward on meta tensors through the fake process group.

    Meta tensors have shapes but no autocast, so these are fp32 activations; FSDP refuses to run on
    meta parameters, so under zero=3 with dp > 1 there is no figure (None).
    """
    if dims.dp > 1 and cfg.parallel.zero == 3:
        return None
    last = dims.pp * cfg.parallel.pp_stages_per_rank - 1
    b, t = cfg.train.micro_batch_size, cfg.model.seq_len
    saved: dict[int, tuple[torch.Tensor, int]] = {}  # each tensor once (kept alive, so ids stay unique)

    def pack(x: torch.Tensor) -> torch.Tensor:
        base = x._base if x._base is not None else x
        if not isinstance(base, nn.Parameter) and id(base) not in saved:  # weights are not activations
            saved[id(base)] = (base, _local(base).numel() * _local(base).element_size())
        return x

    t //= dims.cp  # the rank's chunks of each sequence, at their global positions
    forward = {"position_ids": global_positions(cfg.model.seq_len, dims.cp, dims.cp_rank, "meta").unsqueeze(0)
               } if dims.cp > 1 else {}
    ids = torch.zeros(b, t, dtype=torch.long, device="meta")
    local_t = t // dims.tp if cfg.parallel.sequence_parallel and dims.tp > 1 else t  # a stage's input, split under sp
    with loss_context(dims), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        for layers, stage in zip(splits, stages, strict=True):
            view = model.view(layers, embeddings=stage == 0, head=stage == last) if dims.pp > 1 else model
            x = ids if stage == 0 else torch.empty(b, local_t, cfg.model.hidden, device="meta", requires_grad=True)
            view(x, ids if stage == last else None, **forward)
    return sum(n for _, n in saved.values())


def _collectives(cfg: Config, dims: ParallelDims, model: nn.Module, optimizer: torch.optim.Optimizer,
                 layers: int, stages: list[int]) -> list[dict[str, Any]]:
    """The collectives of one step on this rank: kind, group, how many, bytes this rank puts in."""
    m = microbatches(cfg, dims.dp, cfg.train.global_batch_size)
    out: list[dict[str, Any]] = []

    def add(op: str, group: str, count: int, nbytes: float, when: str) -> None:
        if count:
            out.append({"op": op, "group": group, "count": count, "bytes": int(nbytes), "when": when})

    if isinstance(optimizer, ZeroAdamW):
        for op in ("all_reduce", "reduce_scatter", "all_gather"):
            sizes = [b for kind, b in optimizer.collectives() if kind == op]
            add(op, "dp", len(sizes), sum(sizes), "once per step (backward buckets)" if op != "all_gather"
                else "once per step (after the update)")
    elif dims.dp > 1:
        units = [_unit_bytes(u) * dims.dp_shard for u in model.modules() if isinstance(u, FSDPModule)]
        gathers = m * (2 if cfg.parallel.reshard_after_forward else 1)
        add("all_gather", "dp_shard", gathers * len(units), gathers * sum(units), "per micro-batch, per FSDP unit")
        add("reduce_scatter", "dp_shard", len(units), sum(units), "once per step")
        if dims.dp_replicate > 1:
            add("all_reduce", "dp_replicate", len(units), sum(units) / dims.dp_shard, "once per step")
    tokens = cfg.train.micro_batch_size * cfg.model.seq_len // dims.cp  # of a micro-batch, on this rank
    if dims.tp > 1:  # Megatron's f and g: per block 2 forward + 2 backward, each of a (b, s, h) activation
        act = tokens * cfg.model.hidden * 2  # bf16/fp16 activations
        op = "all_gather+reduce_scatter" if cfg.parallel.sequence_parallel else "all_reduce"
        add(op, "tp", 4 * layers * m, 4 * layers * m * act, "per block, per micro-batch")
    if dims.cp > 1:
        out += _context_parallel(cfg, dims, model, optimizer, layers, m)
    if dims.pp > 1:  # the fp32 residual stream (split by sequence under sp), out and its gradient back, per boundary
        act = tokens * cfg.model.hidden * FP32
        act /= dims.tp if cfg.parallel.sequence_parallel else 1
        last = dims.pp * cfg.parallel.pp_stages_per_rank - 1
        hops = sum(2 * ((s > 0) + (s < last)) for s in stages)
        add("send/recv", "pp", hops * m, hops * m * act, "per stage boundary, per micro-batch")
    return out


def _context_parallel(cfg: Config, dims: ParallelDims, model: nn.Module, optimizer: torch.optim.Optimizer,
                      layers: int, m: int) -> list[dict[str, Any]]:
    """The collectives over the cp ranks in a step of ``m`` micro-batches through ``layers`` layers.

    Ring attention's transfers (``ring_transfers``), the gradients' all-reduce, and the MoE layers' expert
    counts (and, with a capacity, their choices)."""
    mc, cp = cfg.model, dims.cp
    steps, ring = ring_transfers(cfg.train.micro_batch_size * mc.seq_len // cp, mc.n_heads // dims.tp, mc.head_dim,
                                 cp, FP32 if cfg.train.precision == "fp32" else 2, mc.recompute != "none")
    if isinstance(optimizer, ZeroAdamW):  # each bucket after its dp reduction: zero=1 whole, zero=2 the owned rows
        kind = "all_reduce" if optimizer.stage == 1 else "all_gather"
        sizes = [b for op, b in optimizer.collectives() if op == kind]
    else:  # average_gradients: every local gradient
        sizes = [_bytes(iter([p])) for p in model.parameters()]
    out = [{"op": "send/recv", "group": "cp", "count": steps * layers * m, "bytes": ring * layers * m,
            "when": "ring attention, per attention layer, per micro-batch"},
           {"op": "all_reduce", "group": "cp", "count": len(sizes), "bytes": int(sum(sizes)),
            "when": "once per step (gradients)"}]
    moe = sum(isinstance(x, MoE) for x in model.modules()) * m
    if moe:  # per MoE layer and micro-batch: the expert counts (int64) summed; with a capacity, the choices gathered
        out.append({"op": "all_reduce", "group": "cp", "count": moe, "bytes": moe * mc.moe_experts * 8,
                    "when": "per MoE layer, per micro-batch (expert counts)"})
        if mc.moe_capacity_factor:
            ids = cfg.train.micro_batch_size * mc.seq_len // cp * mc.moe_top_k * 8
            out.append({"op": "all_gather", "group": "cp", "count": moe, "bytes": moe * ids,
                        "when": "per MoE layer, per micro-batch (expert choices, for the capacity)"})
    return out


def _unit_bytes(unit: nn.Module) -> int:
    """Local bytes of the parameters FSDP unit ``unit`` manages itself (not those of nested units)."""
    nested = {id(p) for sub in unit.modules() if sub is not unit and isinstance(sub, FSDPModule)
              for p in sub.parameters()}
    return _bytes(p for p in unit.parameters() if id(p) not in nested)


def render(report: dict[str, Any]) -> str:
    """The dry run's text report."""
    from mtnlg.util.fmt import human

    lay, coords = report["layout"], report["coordinates"]
    gib = float(1 << 30)
    lines = [
        f"rank {report['rank']} of {report['world_size']}: tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} "
        + (f"cp={lay['cp']} " if lay["cp"] > 1 else "") + f"zero={lay['zero']}; coordinates pp {coords['pp']} "
        f"dp {coords['dp']} " + (f"cp {coords['cp']} " if lay["cp"] > 1 else "") + f"tp {coords['tp']}",
        f"stages           {', '.join(map(str, report['stages']))} (layers {report['layers'][0]}-"
        f"{report['layers'][1]})" if report["layers"] else "stages           (no layers)",
        f"parameters       {human(report['parameters'])} on this rank",
        f"memory           weights {report['parameter_bytes'] / gib:.2f} GiB, gradients "
        f"{report['gradient_bytes'] / gib:.2f} GiB, optimizer {report['optimizer_bytes'] / gib:.2f} GiB",
        "collectives of one step:",
        *(f"  {c['op']:<26s} {c['group']:<13s} x{c['count']:<6d} {c['bytes'] / gib:9.2f} GiB  {c['when']}"
          for c in report["collectives"]),
        *([f"activations      {report['activation_bytes'] / gib:.2f} GiB saved for backward by one micro-batch "
           "(fp32: meta tensors do not autocast)"] if report["activation_bytes"] is not None else []),
        f"built in {report['seconds']:.1f} s",
    ]
    return "\n".join(lines)
