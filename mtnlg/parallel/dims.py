"""``ParallelDims``: how the world of processes is split, and the one ``DeviceMesh`` that names it.

The world is a grid ``pp x dp x cp x tp`` (pipeline stages x data-parallel ranks x context-parallel
ranks x tensor-parallel ranks), the data-parallel axis itself ``dp_replicate x dp_shard`` (HSDP: model
replicas, each fully sharded over ``dp_shard`` ranks). Ranks are laid out tp-minor, pp-major::

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank,   dp_rank = replica * dp_shard + shard

so tensor-parallel peers, which talk inside every layer, are consecutive ranks: the GPUs of
one node when ``tp <= gpus_per_node``, as in MT-NLG's 8-way tensor slicing inside DGX nodes.
Pipeline stages, which only pass activations at stage boundaries, vary slowest (across
nodes); this is DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model).

Expert parallelism borrows its ranks from data parallelism (torchtitan, Megatron-Core): ``ep``
consecutive ranks of ``dp_shard`` split each MoE layer's experts between them and exchange tokens
by all-to-all; the mesh then names ``dp_shard = dp_shard_mod_ep x ep``, and the experts are
sharded by FSDP over ``dp_shard_mod_ep`` (with ``dp_replicate``) only.

A ``ParallelDims`` is the only distributed state in mtnlg: it is built once per process and
passed explicitly; nothing reads process groups from globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mtnlg.config import ConfigError, ParallelConfig
from mtnlg.util import dist as rank_info

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EP_MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp")


@dataclass
class ParallelDims:
    """Sizes of each parallel dimension, validated against the world size, and their mesh."""

    dp: int
    pp: int
    tp: int
    world_size: int
    dp_replicate: int = 1
    ep: int = 1
    cp: int = 1  # context parallelism: ranks splitting each sample's sequence (context.py), between dp and tp
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: DeviceMesh | None = field(default=None, repr=False)
    dp_mesh: DeviceMesh | None = field(default=None, repr=False)  # dp_replicate x dp_shard, flattened

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp", "cp", "world_size", "dp_replicate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} must divide the data-parallel shard size {self.dp_shard} "
                              "(dp / dp_replicate): expert parallelism borrows its ranks from data parallelism")
        if self.dp % self.dp_replicate:
            raise ConfigError(f"parallel.dp_replicate={self.dp_replicate} does not divide the data-parallel size "
                              f"{self.dp}: dp = dp_replicate x dp_shard")
        if self.dp * self.pp * self.cp * self.tp != self.world_size:
            raise ConfigError(
                f"parallel.dp={self.dp} x parallel.pp={self.pp} x parallel.cp={self.cp} x parallel.tp={self.tp} = "
                f"{self.dp * self.pp * self.cp * self.tp} processes, but the world has {self.world_size}: "
                "launch that many (torchrun --nproc_per_node=N) or change the parallel sizes"
            )

    @classmethod
    def from_config(
        cls, cfg: ParallelConfig, world_size: int, device: torch.device | str = "cpu"
    ) -> ParallelDims:
        """Resolve ``dp = -1`` (whatever tp and pp leave) and check the product is the world size."""
        cfg.validate()
        dp = cfg.dp
        if dp == -1:
            if world_size % (cfg.tp * cfg.pp * cfg.cp):
                raise ConfigError(
                    f"the world size {world_size} is not divisible by parallel.tp={cfg.tp} x "
                    f"parallel.pp={cfg.pp} x parallel.cp={cfg.cp}: launch a multiple of "
                    f"{cfg.tp * cfg.pp * cfg.cp} processes"
                )
            dp = world_size // (cfg.tp * cfg.pp * cfg.cp)
        if cfg.dp_shard != -1 and cfg.dp_replicate * cfg.dp_shard != dp:
            raise ConfigError(f"parallel.dp_replicate={cfg.dp_replicate} x parallel.dp_shard={cfg.dp_shard} must "
                              f"equal the data-parallel size {dp}")
        return cls(dp=dp, pp=cfg.pp, tp=cfg.tp, world_size=world_size, dp_replicate=cfg.dp_replicate, ep=cfg.ep,
                   cp=cfg.cp, device=torch.device(device))

    def build_mesh(self) -> DeviceMesh:
        """Create the named ``(pp, dp_replicate, dp_shard, tp)`` mesh over the initialized default process group."""
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelDims.build_mesh needs torch.distributed initialized (see init_distributed)"
            )
        if self.ep > 1:  # dp_shard = dp_shard_mod_ep x ep, ep minor
            shape = (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep, self.cp, self.tp)
            self.mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=EP_MESH_DIMS)
            self.mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
            if self.dp_replicate == 1:  # kept, not sliced from the root again (torch deprecates that)
                self.dp_mesh = self.mesh["dp_shard_mod_ep", "ep"]._flatten("dp")
                return self.mesh
        else:
            shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
            self.mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=MESH_DIMS)
        self.dp_mesh = self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return self.mesh

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP shards over: 1-D ``dp_shard``, or 2-D ``(dp_replicate, dp_shard)`` for HSDP."""
        if self.mesh is None:
            raise RuntimeError("no device mesh: this ParallelDims was built without init_distributed")
        if self.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.dp_mesh if self.ep > 1 else self.mesh["dp_shard"]  # under ep: dp_shard, flattened and kept

    @property
    def ep_mesh(self) -> DeviceMesh:
        """The 1-D mesh of the ranks that split each MoE layer's experts between them."""
        if self.mesh is None or self.ep == 1:
            raise RuntimeError("no expert-parallel mesh: parallel.ep is 1 or torch.distributed is not initialized")
        return self.mesh["ep"]

    @property
    def expert_fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP shards expert-parallel weights over: the data-parallel ranks holding the same experts."""
        if self.mesh is None or self.ep == 1:
            raise RuntimeError("no expert-parallel mesh: parallel.ep is 1 or torch.distributed is not initialized")
        return self.mesh["dp_replicate", "dp_shard_mod_ep"] if self.dp_replicate > 1 else self.mesh["dp_shard_mod_ep"]

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def tp_mesh(self) -> DeviceMesh:
        """The 1-D mesh of this rank's tensor-parallel peers."""
        if self.mesh is None:
            raise RuntimeError("no device mesh: this ParallelDims was built without init_distributed")
        return self.mesh["tp"]

    @property
    def tp_rank(self) -> int:
        return self.tp_mesh.get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        """Which data-parallel replica this rank belongs to: its tp peers read the same samples."""
        return self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The group to average over data-parallel replicas (None in a single process)."""
        return self.dp_mesh.get_group() if self.dp_mesh is not None else None

    @property
    def cp_rank(self) -> int:
        """This rank's place among the context-parallel ranks that split the same samples' sequences."""
        return self.mesh["cp"].get_local_rank() if self.mesh is not None else 0

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The context-parallel peers: the ring of ring attention, and a gradient-averaging group like dp."""
        return self.mesh["cp"].get_group() if self.mesh is not None else None

    @property
    def pp_rank(self) -> int:
        """Which pipeline position this rank holds (0: the stage with the embeddings)."""
        return self.mesh["pp"].get_local_rank() if self.mesh is not None else 0

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """This rank's pipeline peers: the ranks holding the other stages of its replica and tp shard."""
        return self.mesh["pp"].get_group() if self.mesh is not None else None

    @property
    def rank(self) -> int:
        return rank_info.rank()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files every rank agrees on."""
        return rank_info.is_main()


def _rank_device(device: torch.device | str | None) -> torch.device:
    """This process's device: by default the GPU when one is visible; a GPU per rank (LOCAL_RANK)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(cfg: ParallelConfig, device: torch.device | str | None = None) -> ParallelDims:
    """The ``ParallelDims`` of this process, initializing torch.distributed when there are several.

    Under ``torchrun`` the world comes from its environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``, ...); a process group initialized beforehand (e.g. by a test harness) is
    reused. The backend follows the device: NCCL for CUDA, gloo for CPU. A single process gets
    dims without a mesh and never touches torch.distributed. ``cfg.timeout_s`` bounds every wait
    for the other ranks (rendezvous and collectives), so a rank that died or hangs fails the job
    instead of stalling it; torchrun then names the rank that failed first.
    """
    device = _rank_device(device)
    initialized = dist.is_available() and dist.is_initialized()
    world_size = rank_info.world_size()
    dims = ParallelDims.from_config(cfg, world_size, device)
    if world_size == 1:
        return dims
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not initialized:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=cfg.timeout_s)
        try:
            dist.init_process_group(backend=backend, timeout=timeout, **_attempt_store(timeout))
        except dist.DistError as exc:
            rank = os.environ.get("RANK", "?")
            raise RuntimeError(f"rank {rank} of {world_size}: the other ranks did not all join within "
                               f"parallel.timeout_s={cfg.timeout_s:g} s: {exc}") from exc
    dims.build_mesh()
    return dims


def _attempt_store(timeout: timedelta) -> dict:
    """Under ``torchrun --max-restarts``, the process group's keys under this attempt's own prefix.

    torchrun's workers share its rendezvous store, which outlives a restart; the keys a process
    group writes (the gloo peers' addresses, ...) would be found there by the next attempt, which
    then connects to the dead ranks. An empty dict (init_process_group's own store) otherwise.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    return {"store": dist.PrefixStore(f"mtnlg/attempt_{attempt}", store), "rank": rank, "world_size": world_size}


def destroy_distributed() -> None:
    """Tear down the process group (torchrun expects each rank to exit cleanly)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
