"""A training layout as the planner sees it: how the GPUs and the batch are split, and what is saved.

This is the planner's own description (no process groups): ``tp x cp x pp x dp = gpus``, the batch
``global = micro x dp x microbatches``, ZeRO sharding over the dp ranks, activation recomputation,
sequence parallelism, context parallelism (``cp``: each sequence split over cp ranks) and the
pipeline schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mtnlg.config import ConfigError, ModelConfig
from mtnlg.config.schedules import SCHEDULES, bubble_slots, busiest_rank_layers, check_stages_per_rank

RECOMPUTE = ("none", "selective", "full")
# The levels --recompute auto and --search try, least recomputation first: mtnlg train runs all three
# (model.recompute; selective is the attention core under torch.utils.checkpoint, mtnlg.model.gpt).
RUNNABLE_RECOMPUTE = RECOMPUTE
PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Layout:
    """One candidate layout. ``virtual_stages`` > 1 means the interleaved 1F1B schedule."""

    gpus: int
    tp: int = 1
    pp: int = 1
    dp: int = 0
    micro_batch: int = 1
    global_batch: int = 1
    virtual_stages: int = 1
    zero: int = 0
    recompute: str = "none"
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    precision: str = "bf16"
    flash_attention: bool = False
    optimizer: str = "adamw"
    cp: int = 1

    @property
    def microbatches(self) -> int:
        """Micro-batches per step per data-parallel replica (the pipeline's m)."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def element_bytes(self) -> int:
        """Bytes of one activation / compute-copy weight element."""
        return 4 if self.precision == "fp32" else 2

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def make_layout(gpus: int, tp: int = 1, pp: int = 1, dp: int = 0, cp: int = 1, **kwargs: object) -> Layout:
    """A validated Layout; ``dp`` 0 means ``gpus / (tp * cp * pp)``. Errors name the flag to change."""
    if gpus < 1 or tp < 1 or pp < 1 or cp < 1 or dp < 0:
        raise ConfigError(f"plan: --gpus, --tp, --pp and --cp must be >= 1 and --dp >= 1 (got gpus={gpus} tp={tp} "
                          f"pp={pp} cp={cp} dp={dp})")
    with_cp = f" x --cp {cp}" if cp > 1 else ""
    if gpus % (tp * pp * cp):
        raise ConfigError(f"plan: --tp {tp} x --pp {pp}{with_cp} = {tp * pp * cp} does not divide --gpus {gpus}")
    dp = dp or gpus // (tp * pp * cp)
    if tp * pp * cp * dp != gpus:
        raise ConfigError(f"plan: --tp {tp} x --pp {pp}{with_cp} x --dp {dp} = {tp * pp * cp * dp} GPUs, "
                          f"not --gpus {gpus}")
    layout = Layout(gpus=gpus, tp=tp, pp=pp, dp=dp, cp=cp, **kwargs)  # type: ignore[arg-type]
    _check_choices(layout)
    _check_batch(layout)
    return layout


def _check_choices(lay: Layout) -> None:
    if lay.recompute not in RECOMPUTE:
        raise ConfigError(f"plan: --recompute must be one of {', '.join(RECOMPUTE)}, got {lay.recompute!r}")
    if lay.schedule not in SCHEDULES:
        raise ConfigError(f"plan: schedule must be one of {', '.join(SCHEDULES)}, got {lay.schedule!r}")
    if lay.pp > 1:
        check_stages_per_rank(lay.schedule, lay.virtual_stages)
    if lay.precision not in PRECISIONS:
        raise ConfigError(f"plan: --precision must be one of {', '.join(PRECISIONS)}, got {lay.precision!r}")
    if lay.zero not in (0, 1, 2, 3):
        raise ConfigError(f"plan: --zero must be 0 (none), 1 (optimizer), 2 (+gradients) or 3 (FSDP), got {lay.zero}")
    if lay.virtual_stages < 1:
        raise ConfigError(f"plan: --virtual-stages must be >= 1, got {lay.virtual_stages}")
    if lay.virtual_stages > 1 and lay.pp == 1:
        raise ConfigError("plan: --virtual-stages > 1 needs --pp > 1 (it interleaves pipeline stages)")
    if lay.sequence_parallel and lay.tp == 1:
        raise ConfigError("plan: --sequence-parallel needs --tp > 1 (it shards activations over the tp ranks)")


def _check_batch(lay: Layout) -> None:
    if lay.micro_batch < 1 or lay.global_batch < 1:
        raise ConfigError(f"plan: --micro-batch and --global-batch must be >= 1 (got {lay.micro_batch}, "
                          f"{lay.global_batch})")
    per_step = lay.micro_batch * lay.dp
    if lay.global_batch % per_step:
        raise ConfigError(f"plan: --global-batch {lay.global_batch} is not a multiple of --micro-batch "
                          f"{lay.micro_batch} x dp {lay.dp} = {per_step}")
    if lay.virtual_stages > 1 and lay.microbatches % lay.pp:
        raise ConfigError(f"plan: the interleaved schedule needs the micro-batches per replica "
                          f"({lay.microbatches}) to be a multiple of --pp {lay.pp}")


def check_model(cfg: ModelConfig, lay: Layout) -> None:
    """The model splits this way: whole heads per tp rank, at least one layer per (virtual) stage."""
    if cfg.n_heads % lay.tp:
        raise ConfigError(f"plan: --tp {lay.tp} does not divide model.n_heads={cfg.n_heads}")
    if cfg.kv_heads % lay.tp:
        raise ConfigError(f"plan: --tp {lay.tp} does not divide model.n_kv_heads={cfg.kv_heads}")
    if lay.cp > 1 and (cfg.seq_len % (2 * lay.cp) or cfg.dropout > 0):
        raise ConfigError(f"plan: --cp {lay.cp} needs model.seq_len % {2 * lay.cp} == 0 (got {cfg.seq_len}) and "
                          f"model.dropout=0 (got {cfg.dropout})")
    if cfg.n_layers < lay.pp * lay.virtual_stages:
        raise ConfigError(f"plan: {lay.pp * lay.virtual_stages} pipeline stages for model.n_layers="
                          f"{cfg.n_layers}: every stage needs a layer")


def local_seq_len(cfg: ModelConfig, lay: Layout) -> float:
    """Tokens of each sequence one rank holds: ``seq_len / cp``."""
    return cfg.seq_len / lay.cp


def layers_per_rank(cfg: ModelConfig, lay: Layout) -> int:
    """Layers on the busiest pipeline rank, as the trainer splits and places them."""
    return busiest_rank_layers(cfg.n_layers, lay.pp, lay.virtual_stages, lay.schedule)


def in_flight(lay: Layout) -> float:
    """Micro-batches whose activations the first pipeline rank holds at its peak.

    1F1B: ``pp`` (the warm-up forwards before the first backward); interleaved with ``v`` stages
    per rank: ``pp (1 + (pp - 1) / (pp v))`` in units of the rank's layers (Korthikanti et al. 2022,
    section 4.2.3); GPipe: every micro-batch; no pipeline: one.
    """
    m = lay.microbatches
    if lay.pp == 1:
        return 1.0
    if lay.schedule == "gpipe":
        return float(m)
    if lay.virtual_stages > 1:
        return min(float(m), lay.pp + (lay.pp - 1) / lay.virtual_stages)
    return float(min(m, lay.pp))


def step_bubble_slots(lay: Layout) -> float:
    """Idle micro-batch slots of a step (``mtnlg.config.schedules.bubble_slots``)."""
    return bubble_slots(lay.schedule, lay.pp, lay.virtual_stages)
