"""Activation memory of one llama-tiny block per rank vs sequence length, for each ``model.recompute`` mode
and context-parallel size: the bytes autograd saves for backward (a saved-tensor probe: each storage once,
parameters excluded), fp32, one sample. On a GPU it also prints the peak allocated during forward+backward.

With ``--dropout`` > 0 the attention runs SDPA's math path, which keeps the s^2 softmax (CPU flash
attention, the default path, keeps only its log-sum-exp); ring attention (cp > 1) has no dropout.

    .venv/bin/python benchmarks/long_sequences.py [--seq-lens 1024,2048,4096] [--dropout 0.1]
    torchrun --nproc_per_node=2 benchmarks/long_sequences.py     # cp = the world size (gloo)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from run_info import run_info  # noqa: E402

from mtnlg.config.presets import get_preset  # noqa: E402
from mtnlg.model.gpt import GPT  # noqa: E402
from mtnlg.parallel.context import apply_context_parallel, global_positions, shard_sequence  # noqa: E402

MODES = ("none", "selective", "full")


def block_bytes(seq_len: int, recompute: str, dropout: float, cp: int, rank: int, device: str) -> dict[str, float]:
    """Saved-tensor MiB (and the GPU's peak MiB) of block 0 of llama-tiny at ``seq_len`` on one cp rank."""
    cfg = dataclasses.replace(get_preset("llama-tiny"), seq_len=seq_len, n_layers=1, recompute=recompute,
                              dropout=dropout)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    if cp > 1:
        apply_context_parallel(model, dist.group.WORLD)
    block = model.view([0], embeddings=False, head=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if (ptr := tensor.untyped_storage().data_ptr()) not in params:
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    x = shard_sequence(torch.randn(1, seq_len, cfg.hidden, device=device), cp, rank).requires_grad_()
    positions = global_positions(seq_len, cp, rank, device).unsqueeze(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, position_ids=positions)
    out.sum().backward()
    result = {"saved_mib": sum(saved.values()) / 2**20}
    if device == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="1024,2048,4096")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (rank 0)")
    args = p.parse_args()
    load = os.getloadavg()
    torch.set_num_threads(1)
    cp = int(os.environ.get("WORLD_SIZE", "1"))
    if cp > 1 and args.dropout > 0:
        p.error("ring attention (cp > 1) has no attention dropout: --dropout 0")
    if cp > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if cp > 1 else 0
    device = "cuda" if torch.cuda.is_available() and cp == 1 else "cpu"
    rows = []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        for mode in MODES:
            rows.append({"seq_len": seq_len, "cp": cp, "recompute": mode, "dropout": args.dropout,
                         **block_bytes(seq_len, mode, args.dropout, cp, rank, device)})
            if rank == 0:
                print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    if rank == 0 and args.out:
        args.out.write_text(json.dumps({"rows": rows, "device": device, "run": run_info(load)}, indent=1) + "\n")
    if cp > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
