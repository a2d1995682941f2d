"""The planner against published step times: MT-NLG 530B, Megatron-LM's weak-scaling table, and
Korthikanti et al.'s recomputation table. Prints a Markdown table (used in docs/planning.md) and writes JSON.

Published step times come from the papers: MT-NLG reports seconds per iteration (Smith et al. 2022);
Narayanan et al. 2021 (Table 1) report TFLOP/s per GPU, converted back to seconds with their FLOP
count 96 B s l h^2 (1 + s/6h + V/16lh) (full recomputation); Korthikanti et al. 2022 (Table 5)
report seconds per iteration with full recomputation and with selective recomputation + sequence
parallelism. Unstated settings are assumed: micro-batch 1, no interleaving, no ZeRO.

    .venv/bin/python benchmarks/plan_calibration.py [--out benchmarks/results/plan_calibration.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtnlg.config import ModelConfig
from mtnlg.config.presets import get_preset
from mtnlg.planner import GPUS, make_layout, plan

S, V = 2048, 51200
# name, heads, hidden, layers, tp, pp, gpus, global batch, published TFLOP/s per GPU
NARAYANAN = [
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137), ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138),
    ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142), ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135),
    ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138), ("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140),
    ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148), ("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    ("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163), ("1008B", 160, 25600, 128, 8, 64, 3072, 3072, 163),
]  # fmt: skip
# name, heads, hidden, layers, tp, pp, gpus, global batch, seconds (full), seconds (selective + SP)
KORTHIKANTI = [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 1.42, 1.10), ("175B", 96, 12288, 96, 8, 8, 64, 64, 18.13, 13.75),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 49.05, 37.83), ("1T", 160, 25600, 128, 8, 64, 512, 512, 94.42, 71.49),
]  # fmt: skip
MT_NLG = [(2240, 60.1), (2800, 50.2), (3360, 44.4)]


def predict(cfg: ModelConfig, gpus: int, tp: int, pp: int, batch: int, recompute: str, sp: bool = False) -> float:
    lay = make_layout(gpus, tp, pp, global_batch=batch, recompute=recompute, sequence_parallel=sp)
    return plan(cfg, lay, GPUS["a100-80gb"]).time.step


def rows() -> list[dict[str, object]]:
    """One row per published point: source, run, published and predicted seconds per step."""
    out: list[dict[str, object]] = []
    mt = get_preset("mt-nlg-530b")
    for gpus, seconds in MT_NLG:
        out.append({"source": "MT-NLG (Smith et al. 2022)", "run": f"530B, {gpus} GPUs, tp8 pp35, batch 1920",
                    "published_s": seconds, "predicted_s": predict(mt, gpus, 8, 35, 1920, "full")})
    for name, a, h, layers, tp, pp, gpus, batch, tflops in NARAYANAN:
        cfg = ModelConfig(vocab_size=V, seq_len=S, n_layers=layers, hidden=h, n_heads=a)
        seconds = 96 * batch * S * layers * h * h * (1 + S / (6 * h) + V / (16 * layers * h)) / (gpus * tflops * 1e12)
        out.append({"source": "Narayanan et al. 2021, Table 1", "run": f"{name}, {gpus} GPUs, tp{tp} pp{pp}",
                    "published_s": seconds, "predicted_s": predict(cfg, gpus, tp, pp, batch, "full")})
    for name, a, h, layers, tp, pp, gpus, batch, full, selective in KORTHIKANTI:
        cfg = ModelConfig(vocab_size=V, seq_len=S, n_layers=layers, hidden=h, n_heads=a)
        variants = (("full", full, "full", False), ("selective+SP", selective, "selective", True))
        for label, seconds, recompute, sp in variants:
            out.append({"source": "Korthikanti et al. 2022, Table 5",
                        "run": f"{name}, {gpus} GPUs, tp{tp} pp{pp}, {label}", "published_s": seconds,
                        "predicted_s": predict(cfg, gpus, tp, pp, batch, recompute, sp)})
    for row in out:
        row["error"] = row["predicted_s"] / row["published_s"] - 1  # type: ignore[operator]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan_calibration.json"))
    args = parser.parse_args()
    table = rows()
    print("| source | run | published s/step | predicted | error |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['source']} | {r['run']} | {r['published_s']:.2f} | {r['predicted_s']:.2f} | {r['error']:+.1%} |")
    Path(args.out).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
