"""``--search``: every layout of a cluster that fits, ranked by predicted step time.

The search varies what the caller did not fix: tp over powers of two within a node that divide
the heads, pp over the divisors of gpus / tp (at most one stage per layer), micro-batch 1-8,
stages per rank and schedule (interleaved 1F1B; with two, also the V schedules zbv and dualpipev,
which ``mtnlg train`` runs with data parallelism under ZeRO 1/2 only), ZeRO stage, recomputation
(none or full: the modes ``mtnlg train`` has), sequence parallelism and context parallelism (cp over
powers of two with ``seq_len % 2 cp == 0`` and chunks of at least ``MIN_CP_CHUNK`` tokens, for a model
without dropout). Every layout it ranks is
one ``mtnlg train`` runs (``report.train_command`` prints it). The global batch is fixed (it
changes the optimisation, not only the speed).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from mtnlg.config import ConfigError, ModelConfig
from mtnlg.config.schedules import SCHEDULES
from mtnlg.planner import Plan, plan
from mtnlg.planner.hardware import GpuSpec
from mtnlg.planner.layout import RECOMPUTE, RUNNABLE_RECOMPUTE, make_layout

# Smallest head/tail chunk (tokens) --search splits a sequence into: shorter blocks cannot hide the ring's
# transfers behind their attention, and every cp value multiplies the candidates.
MIN_CP_CHUNK = 512
FIXABLE = ("tp", "pp", "dp", "cp", "micro_batch", "virtual_stages", "zero", "recompute", "sequence_parallel",
           "schedule")


def _choices(cfg: ModelConfig, gpu: GpuSpec, gpus: int, fixed: dict[str, object]) -> dict[str, list[object]]:
    """Candidate values of each layout knob; a fixed knob has its one value."""
    tps = [t for t in (1, 2, 4, 8, 16) if t <= gpu.gpus_per_node and gpus % t == 0 and cfg.kv_heads % t == 0]
    choices: dict[str, list[object]] = {
        "tp": list(tps),
        "pp": [p for p in range(1, min(gpus, cfg.n_layers) + 1) if gpus % p == 0],
        "micro_batch": [1, 2, 4, 8],
        "virtual_stages": [1, 2, 3, 4],
        "zero": [0, 1, 2, 3],
        "recompute": list(RUNNABLE_RECOMPUTE),
        "sequence_parallel": [False, True],
        "cp": [c for c in (1, 2, 4, 8, 16) if c == 1 or (gpus % c == 0 and cfg.seq_len % (2 * c) == 0
                                                        and cfg.seq_len // (2 * c) >= MIN_CP_CHUNK
                                                        and cfg.dropout == 0)],
    }
    for key, value in fixed.items():
        if value is not None and key in choices:
            choices[key] = [value]
    if fixed.get("recompute") in RECOMPUTE:
        choices["recompute"] = [fixed["recompute"]]
    return choices


def _schedules(pp: int, v: int, zero: int, dp: int, fixed: object) -> list[str]:
    """Schedules for ``v`` stages per rank that mtnlg train runs under this data parallelism."""
    if pp == 1:
        return ["1f1b"]
    names = ["1f1b"] if v == 1 else ["interleaved_1f1b"] + (["zbv", "dualpipev"] if v == 2 else [])
    names = [n for n in names if not (SCHEDULES[n].v_shaped and dp > 1 and zero in (0, 3))]
    return [n for n in names if n == fixed] if fixed else names


def candidates(cfg: ModelConfig, gpu: GpuSpec, gpus: int, global_batch: int,
               fixed: dict[str, object], tokens: float = 0.0, **common: object) -> Iterable[Plan]:
    """Plans of every valid combination (invalid ones, e.g. a batch that does not split, are skipped)."""
    ch = _choices(cfg, gpu, gpus, fixed)
    for tp, pp, cp, mb, v, zero, rec, sp in itertools.product(
        ch["tp"], ch["pp"], ch["cp"], ch["micro_batch"], ch["virtual_stages"], ch["zero"], ch["recompute"],
        ch["sequence_parallel"],
    ):
        if (sp and tp == 1) or (v > 1 and (pp == 1 or cfg.n_layers % (pp * v))) or gpus % (tp * pp * cp):
            continue
        dp = fixed.get("dp") or gpus // (tp * pp * cp)
        if tp * pp * cp * dp != gpus or (zero and dp == 1):
            continue
        for name in _schedules(pp, v, zero, dp, fixed.get("schedule")):
            try:
                lay = make_layout(gpus, tp, pp, dp, cp, micro_batch=mb, global_batch=global_batch, virtual_stages=v,
                                  zero=zero, recompute=rec, sequence_parallel=sp, schedule=name, **common)
                yield plan(cfg, lay, gpu, tokens=tokens)
            except ConfigError:
                continue


def search(cfg: ModelConfig, gpu: GpuSpec, gpus: int, global_batch: int, *, fixed: dict[str, object] | None = None,
           top: int = 10, tokens: float = 0.0, **common: object) -> list[Plan]:
    """The ``top`` fitting layouts, fastest first. Raises ConfigError when none fits."""
    fitting = [p for p in candidates(cfg, gpu, gpus, global_batch, fixed or {}, tokens, **common) if p.fits]
    if not fitting:
        raise ConfigError(f"plan --search: no layout of {gpus} x {gpu.name} fits this model with global batch "
                          f"{global_batch} (more GPUs, or a bigger --memory-gb)")
    fitting.sort(key=lambda p: (p.time.step, p.memory.total))
    return fitting[:top]
