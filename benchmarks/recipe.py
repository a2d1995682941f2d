"""The demo's recipe against the modern one at equal wall-clock, on the same validation windows.

``configs/demo.toml`` (GPT blocks, AdamW, cosine) and ``configs/modern.toml`` (Llama-style blocks,
QK-norm, untied output layer, Muon, warmup-stable-decay) on the ``tiny`` preset, the demo's embedded
corpus and 8192-token BPE, the same split (so the same validation windows). Each recipe gets the same
training-clock budget; its schedule must end within it, so the step count is set from step times
measured first (both recipes alternating), with the warmup scaled like the demo's (24 of 280 steps).
Then the two train in alternating slices of ``--slice`` seconds, so both see the same machine load,
and each is evaluated at its last step (``eval_iters`` of the config: the same windows for both).

    .venv/bin/python benchmarks/recipe.py [--minutes 5] [--slice 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from moe import prepare_data
from run_info import run_info

from mtnlg.config import build_config
from mtnlg.data.gpt_dataset import build_datasets
from mtnlg.train.build import build_model
from mtnlg.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"demo": CONFIGS / "demo.toml", "modern": CONFIGS / "modern.toml"}
PROBE_STEPS = 2


def make_trainer(toml: Path, tok: Path, prefix: Path, out: Path, steps: int) -> Trainer:
    warmup = max(1, round(steps * 24 / 280))
    cfg = build_config("tiny", toml, [f"--data.data_path={prefix}", f"--data.tokenizer={tok}",
                                      f"--train.out={out}", "--train.device=cpu", f"--train.steps={steps}",
                                      f"--train.warmup_steps={warmup}", "--train.peak_flops=1.0"])
    tc = cfg.train
    sizes = (tc.global_batch_size * steps, tc.micro_batch_size * tc.eval_iters, 0)
    train, valid, _ = build_datasets(cfg.data, cfg.model.seq_len, sizes)
    return Trainer(cfg, build_model(cfg, torch.device("cpu")), train, valid, progress=False)


def probe(tok: Path, prefix: Path, root: Path) -> dict[str, float]:
    """Seconds per step of each recipe, alternating, after one untimed step."""
    trainers = {name: make_trainer(toml, tok, prefix, root / f"probe-{name}", 100) for name, toml in RECIPES.items()}
    for trainer in trainers.values():
        trainer.train_step()
    seconds = dict.fromkeys(trainers, 0.0)
    for _ in range(PROBE_STEPS):
        for name, trainer in trainers.items():
            seconds[name] += trainer.train_step().seconds
    return {name: s / PROBE_STEPS for name, s in seconds.items()}


def run(minutes: float, slice_s: float, root: Path) -> dict:
    tok, prefix = prepare_data(root)
    budget = 60 * minutes
    step_s = probe(tok, prefix, root)
    steps = {name: max(2, int(budget / s)) for name, s in step_s.items()}
    trainers = {name: make_trainer(RECIPES[name], tok, prefix, root / name, steps[name]) for name in RECIPES}
    valid_0 = {name: trainer.evaluate() for name, trainer in trainers.items()}
    spent, done = dict.fromkeys(RECIPES, 0.0), dict.fromkeys(RECIPES, 0)
    losses: dict[str, list[float]] = {name: [] for name in RECIPES}
    while any(done[n] < steps[n] and spent[n] < budget for n in RECIPES):
        for name, trainer in trainers.items():  # alternate slices: both recipes see the same load
            end = time.perf_counter() + slice_s
            while done[name] < steps[name] and spent[name] < budget and time.perf_counter() < end:
                stats = trainer.train_step()
                spent[name] += stats.seconds
                done[name] += 1
                losses[name].append(stats.loss)
        print({n: f"{spent[n]:.0f} s, step {done[n]}/{steps[n]}" for n in RECIPES}, flush=True)
    return {name: {"planned_steps": steps[name], "steps": done[name], "probe_step_seconds": step_s[name],
                   "train_seconds": spent[name],
                   "tokens": done[name] * trainer.tc.global_batch_size * trainer.cfg.model.seq_len,
                   "train_loss_last": losses[name][-1], "valid_loss_step_0": valid_0[name],
                   "valid_loss": trainers[name].evaluate()} for name, trainer in trainers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training-clock budget of each recipe")
    parser.add_argument("--slice", type=float, default=20.0, help="seconds each recipe trains before the other")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "modern_recipe.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mtnlg-recipe-bench-") as tmp:
        results = run(args.minutes, args.slice, Path(tmp))
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    record["equal_wall_clock"] = {
        "what": "benchmarks/recipe.py: configs/demo.toml vs configs/modern.toml on --preset tiny, equal training "
                "clock, alternating slices, steps set from probed step times so each schedule ends in the budget",
        "budget_minutes_each": args.minutes, "slice_seconds": args.slice, "threads": args.threads,
        "recipes": results,
        "valid_loss_demo_minus_modern": results["demo"]["valid_loss"] - results["modern"]["valid_loss"],
        "run": run_info(load)}
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record["equal_wall_clock"], indent=2))


if __name__ == "__main__":
    main()
