"""Quality per FLOP of the mixture of experts: dense ``tiny`` vs ``tiny-moe`` for the same wall-clock time.

The published claim (Switch Transformer, DeepSpeed-MoE): at equal compute per token, a MoE model
reaches a lower validation loss than the dense one, because it holds more parameters. ``tiny-moe`` is
``tiny`` with every other MLP replaced by 8 experts of half its width, top-2: the same active FLOPs per
token (plus a router), 1.6x the parameters. Both train on the embedded corpus (Python's documentation,
an 8192-token BPE), the same batches in the same order, the same recipe, for the same wall-clock budget;
on a shared machine the two alternate in slices of ``--slice`` seconds so that both see the same load.
Recorded: steps, tokens/s, the last training losses, the validation loss at the end (the same
validation batches for both), total and active parameters, FLOPs per token.

    .venv/bin/python benchmarks/moe.py [--minutes 3] [--slice 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from run_info import run_info

from mtnlg.config import Config, DataConfig, TrainConfig
from mtnlg.config.presets import get_preset
from mtnlg.data.corpus import build_corpus
from mtnlg.data.gpt_dataset import build_datasets
from mtnlg.data.preprocess import preprocess
from mtnlg.data.tokenizer import Tokenizer, iter_text_files
from mtnlg.model.counts import model_info
from mtnlg.train.build import build_model
from mtnlg.train.trainer import Trainer

MODELS = ("tiny", "tiny-moe")
BATCH, VALID_BATCHES = 8, 20


def prepare_data(root: Path) -> tuple[Path, Path]:
    """The embedded corpus, an 8192-token BPE trained on it, and its indexed dataset."""
    build_corpus(root / "corpus.jsonl")
    Tokenizer.train(iter_text_files([root / "corpus.jsonl"]), vocab_size=8192).save(root / "tok")
    preprocess([root / "corpus.jsonl"], root / "tok", root / "data" / "docs", progress=False)
    return root / "tok", root / "data" / "docs"


def make_trainer(name: str, tok: Path, prefix: Path, out: Path) -> Trainer:
    """The same recipe for both: AdamW at 1e-3 after 30 warmup steps, then constant (the run length is set
    by the clock, so no schedule could end at the same point for both)."""
    tc = TrainConfig(micro_batch_size=BATCH, global_batch_size=BATCH, steps=10**6, lr=1e-3, warmup_steps=30,
                     min_lr_ratio=1.0, eval_iters=VALID_BATCHES, peak_flops=1.0, device="cpu", out=str(out))
    cfg = Config(model=get_preset(name), data=DataConfig(data_path=[str(prefix)], tokenizer=str(tok)), train=tc)
    cfg.validate()
    train, valid, _ = build_datasets(cfg.data, cfg.model.seq_len, (BATCH * 20000, BATCH * VALID_BATCHES, 0))
    return Trainer(cfg, build_model(cfg, torch.device("cpu")), train, valid, progress=False)


def run(minutes: float, slice_s: float, root: Path) -> dict:
    tok, prefix = prepare_data(root)
    trainers = {name: make_trainer(name, tok, prefix, root / name) for name in MODELS}
    spent = dict.fromkeys(MODELS, 0.0)
    tokens = dict.fromkeys(MODELS, 0)
    losses: dict[str, list[float]] = {name: [] for name in MODELS}
    budget = 60 * minutes
    while min(spent.values()) < budget:
        for name, trainer in trainers.items():  # alternate slices: both models see the same machine load
            end = time.perf_counter() + min(slice_s, budget - spent[name])
            while spent[name] < budget and time.perf_counter() < end:
                stats = trainer.train_step()
                spent[name] += stats.seconds
                tokens[name] += stats.tokens
                losses[name].append(stats.loss)
        print({name: f"{spent[name]:.0f} s, step {len(losses[name])}, loss {losses[name][-1]:.3f}" for name in MODELS})
    results = {}
    for name, trainer in trainers.items():
        info = model_info(trainer.cfg.model)
        last = losses[name][-20:]
        results[name] = {
            "steps": len(losses[name]), "train_seconds": spent[name], "tokens": tokens[name],
            "tokens_per_s": tokens[name] / spent[name], "train_loss_last_20_steps": sum(last) / len(last),
            "valid_loss": trainer.evaluate(), "parameters": info.parameters,
            "active_parameters": info.active_parameters, "train_flops_per_token": info.train_flops_per_token,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget of each model")
    parser.add_argument("--slice", type=float, default=20.0, help="seconds each model trains before the other")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mtnlg-moe-bench-") as tmp:
        results = run(args.minutes, args.slice, Path(tmp))
    dense, moe = results["tiny"], results["tiny-moe"]
    summary = {
        "valid_loss_dense_minus_moe": dense["valid_loss"] - moe["valid_loss"],
        "moe_reaches_lower_valid_loss": moe["valid_loss"] < dense["valid_loss"],
        "moe_tokens_per_s_relative_to_dense": moe["tokens_per_s"] / dense["tokens_per_s"],
    }
    record = {"benchmark": "moe", "budget_minutes_each": args.minutes, "batch": [BATCH, 256],
              "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "models": results, "summary": summary, "run": run_info(load)}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"models": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
