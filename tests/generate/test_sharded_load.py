"""``load_parallel_for_inference`` on 2 gloo ranks: each rank reads only its shards of the checkpoint.

The model (155 MB of fp32 weights, none larger than 4 MB) is large enough that its bytes dominate
what else the load allocates. Each rank measures the growth of its resident set while loading:
the kernel's peak (``VmHWM``) is reset to the current size just before (``/proc/self/clear_refs``),
so the figure is the load's own peak over the process's baseline, not the baseline itself. That
baseline is taken after loading a tiny checkpoint the same way, so that the pages of torch's and
gloo's code that loading runs for the first time (~15 MB, whatever the model's size) are in it,
and with the allocator set as ``mtnlg`` commands set it (``return_freed_memory``). Half the model
is a rank's share; 0.6 x the whole leaves room for one tensor read at a time. A training step's
``train_state/`` (DCP), the other source of weights, is loaded too, before the measurement.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mtnlg.checkpoint.directory import CONFIG_FILE, TRAIN_STATE_DIR, write_checksums
from mtnlg.checkpoint.model import dcp_call, load_model, save_model
from mtnlg.config import Config, ModelConfig
from tests.harness.dist import run_world

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")

BIG = ModelConfig(vocab_size=2048, seq_len=64, n_layers=12, hidden=512, n_heads=8, init_std=0.3)
TINY = ModelConfig(vocab_size=2048, seq_len=64, n_layers=1, hidden=64, n_heads=8)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _logits_error(model: torch.nn.Module, checkpoint: str) -> float:
    """Largest deviation of ``model``'s logits from those of ``checkpoint`` loaded whole in this process."""
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    full, _, _ = load_model(checkpoint)
    with torch.no_grad():
        logits, expected = model(prompt), full(prompt)
    return ((logits - expected).abs().max() / expected.abs().max()).item()


def _load_on_rank(checkpoint: str, tiny: str, tiny_steps: str) -> dict:
    import torch.distributed as dist

    from mtnlg.config import ParallelConfig
    from mtnlg.generate.load import load_parallel_for_inference
    from mtnlg.util.memory import return_freed_memory

    return_freed_memory()
    small, *_ = load_parallel_for_inference(tiny_steps, ParallelConfig(tp=2))  # from train_state/, by DCP
    train_state_error = _logits_error(small, tiny)
    load_parallel_for_inference(tiny, ParallelConfig(tp=2))  # runs the code the baseline should hold
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS")
    model, cfg, _, dims = load_parallel_for_inference(checkpoint, ParallelConfig(tp=2))
    grown = (_status_kb("VmHWM") - before) * 1024
    return {"rank": dist.get_rank(), "peak_bytes": grown, "tp": dims.tp, "error": _logits_error(model, checkpoint),
            "train_state_error": train_state_error}


def test_each_rank_reads_only_its_shards(tmp_path: Path) -> None:
    torch.manual_seed(0)
    from mtnlg.model.gpt import GPT

    model = GPT(BIG)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    checkpoint = save_model(tmp_path / "big", model, Config(model=BIG))
    del model
    small = GPT(TINY)
    tiny = save_model(tmp_path / "tiny", small, Config(model=TINY))
    steps = tmp_path / "step"  # a training step saved without model.safetensors: config and train_state/ only
    steps.mkdir()
    (steps / CONFIG_FILE).write_text(Config(model=TINY).to_json(), encoding="utf-8")
    dcp_call(dcp.save, {"model": small.state_dict()}, steps / TRAIN_STATE_DIR, local=True)
    write_checksums(steps, local=True)
    results = run_world(_load_on_rank, 2, str(checkpoint), str(tiny), str(steps), timeout=120)
    for r in results:
        assert r["tp"] == 2 and r["error"] < 1e-4  # one process's logits, up to the order of sums
        assert r["train_state_error"] < 1e-5
        print(f"rank {r['rank']}: peak growth {r['peak_bytes'] / 1e6:.1f} MB, {r['peak_bytes'] / whole:.3f} x model")
        assert r["peak_bytes"] <= 0.6 * whole, (r, whole)
