"""The pipeline schedules a run may name, and the arithmetic every user of a name shares.

One table: config validation reads the names, ``mtnlg.parallel.pipeline`` maps each to torch's
schedule class and places stages with ``stage_ids``, and ``mtnlg info`` and the planner compute
the layer split and the bubble with the same functions, so they agree for every schedule.

- loop placement (``1f1b``, ``gpipe``, ``interleaved_1f1b``): rank r runs stages r, r + pp, ...;
- V placement (``zbv``, ``dualpipev``, two stages a rank): rank r runs stages r and 2 pp - 1 - r.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.config.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """What a pipeline schedule asks of the layout, and what it costs in idle time."""

    name: str
    v_shaped: bool  # stages placed in a V (r, 2 pp - 1 - r) instead of a loop (r, r + pp, ...)
    min_stages: int  # stages per rank: at least this many ...
    max_stages: int  # ... and at most this many (0: no limit)
    zero_bubble: bool  # backward split into input- and weight-gradient passes that fill the bubble


SCHEDULES: dict[str, Schedule] = {s.name: s for s in (
    Schedule("1f1b", v_shaped=False, min_stages=1, max_stages=1, zero_bubble=False),
    Schedule("gpipe", v_shaped=False, min_stages=1, max_stages=1, zero_bubble=False),
    Schedule("interleaved_1f1b", v_shaped=False, min_stages=2, max_stages=0, zero_bubble=False),
    Schedule("zbv", v_shaped=True, min_stages=2, max_stages=2, zero_bubble=True),
    Schedule("dualpipev", v_shaped=True, min_stages=2, max_stages=2, zero_bubble=True),
)}


def schedule(name: str) -> Schedule:
    """The schedule called ``name``; a ConfigError naming the choices otherwise."""
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name]


def check_stages_per_rank(name: str, stages_per_rank: int) -> None:
    """A ConfigError unless ``parallel.pp_stages_per_rank`` suits schedule ``name``."""
    s, v = schedule(name), stages_per_rank
    if s.max_stages == 1 and v != 1:
        raise ConfigError(f"parallel.pp_schedule={name} runs one stage per rank: set parallel.pp_stages_per_rank=1 "
                          "or use interleaved_1f1b")
    if s.v_shaped and v != 2:
        raise ConfigError(f"parallel.pp_schedule={name} is a V schedule: set parallel.pp_stages_per_rank=2")
    if v < s.min_stages:
        raise ConfigError(f"parallel.pp_schedule={name} needs parallel.pp_stages_per_rank >= {s.min_stages} "
                          "(or use 1f1b)")


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int, name: str) -> list[int]:
    """The stages pipeline rank ``pp_rank`` runs, in order (loop or V placement, see above)."""
    if schedule(name).v_shaped:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + s * pp for s in range(stages_per_rank)]


def layer_split(n_layers: int, num_stages: int) -> list[range]:
    """Consecutive layer ranges of near-equal size, one per stage.

    When ``n_layers`` does not divide evenly the extra layers go to the middle stages first,
    since the first and last stages also carry the embeddings and the output layer
    (10 layers over 4 stages: 2, 3, 3, 2; 105 over 8: 13, 14, 13, 13, 13, 13, 13, 13).
    """
    if num_stages > n_layers:
        raise ConfigError(
            f"model.n_layers={n_layers} cannot fill {num_stages} pipeline stages (parallel.pp x "
            f"parallel.pp_stages_per_rank): every stage needs at least one layer"
        )
    base, extra = divmod(n_layers, num_stages)
    ends = [s in (0, num_stages - 1) for s in range(num_stages)]
    order = sorted(range(num_stages), key=lambda s: (ends[s], s))  # middle stages first
    sizes = [base + (s in order[:extra]) for s in range(num_stages)]
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def rank_layers(n_layers: int, pp: int, stages_per_rank: int, name: str) -> list[int]:
    """Layers each pipeline rank holds, from the split and the placement the trainer uses."""
    split = layer_split(n_layers, pp * stages_per_rank)
    return [sum(len(split[s]) for s in stage_ids(r, pp, stages_per_rank, name)) for r in range(pp)]


def bubble_slots(name: str, pp: int, stages_per_rank: int) -> float:
    """Idle micro-batch slots of a step: ``(pp - 1) / v`` for the loop schedules (each of the ``pp - 1``
    fill-and-drain slots of 1F1B and GPipe is 1/v as long when a rank runs ``v`` interleaved stages;
    Narayanan et al. 2021); zero for the zero-bubble V schedules, which fill the slots with the
    weight-gradient passes (their papers' model of equal forward, input- and weight-gradient times)."""
    if pp == 1 or schedule(name).zero_bubble:
        return 0.0
    v = stages_per_rank if name == "interleaved_1f1b" else 1
    return (pp - 1) / v


def bubble_fraction(name: str, pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle share of a step, bubble / (bubble + work) for equal-cost stages: (pp - 1) / (v m + pp - 1)."""
    slots = bubble_slots(name, pp, stages_per_rank)
    return slots / (microbatches + slots) if slots else 0.0


def busiest_rank_layers(n_layers: int, pp: int, stages_per_rank: int, name: str) -> int:
    """Layers on the busiest pipeline rank (what its memory and time are sized by)."""
    return max(rank_layers(n_layers, pp, stages_per_rank, name)) if pp > 1 else n_layers

