"""Speculative decoding at batch 1: no speculation vs n-gram prompt lookup vs a draft model.

The workload is code-editing-like: each prompt is a chunk of a Python source file (tokenized
with a BPE trained on it) and greedy decoding continues it. Speculation only pays where the
output repeats what came before, so the target is a model whose greedy output does: a random
model (init std 0.02, nothing downloaded, no training) settles into repeating short runs of
tokens, as an editing model copies most of its input. That is the favourable case by
construction; a real model's acceptance on real edits is lower and depends on the edit. The
draft is a random 1-layer model with the same tokenizer: its guesses are not the target's, so it
shows what a draft that does not know the target costs.

Every round runs each contender once on the same prompts (alternating, on a shared machine);
tokens/s counts new tokens over the whole ``generate`` call (prefill included), and the
medians are compared. Greedy outputs are checked to be identical to no speculation.

    .venv/bin/python benchmarks/speculative.py [--rounds 3] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time
import tokenize
from pathlib import Path

import torch
from run_info import run_info

from mtnlg.config import ModelConfig
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.generate.speculative import make_speculation
from mtnlg.model.gpt import GPT

RESULTS = Path(__file__).parent / "results" / "speculative.json"


def workload(n_prompts: int, prompt_tokens: int) -> tuple[Tokenizer, list[list[int]]]:
    """A BPE trained on a standard-library source file, and chunks of that file as prompts."""
    source = Path(inspect.getfile(tokenize)).read_text()
    tok = Tokenizer.train([source], vocab_size=512)
    ids = tok.encode(source)
    step = max(1, (len(ids) - prompt_tokens) // n_prompts)
    return tok, [ids[i * step : i * step + prompt_tokens] for i in range(n_prompts)]


def model(vocab: int, layers: int, hidden: int, heads: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, seq_len=512, n_layers=layers, hidden=hidden, n_heads=heads,
                           padded_vocab_multiple=64, init_std=0.02)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="guesses per step")
    ap.add_argument("--quick", action="store_true", help="a small model and 1 round (a smoke test)")
    args = ap.parse_args()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    tok, prompts = workload(2 if args.quick else 4, 128)
    layers, hidden = (2, 64) if args.quick else (6, 384)
    target = model(tok.vocab_size, layers, hidden, 6 if hidden % 6 == 0 else 4, 0)
    draft = model(tok.vocab_size, 1, 64, 4, 1)
    contenders = {
        "none": Engine(target, tok, max_batch_size=1),
        "ngram": Engine(target, tok, max_batch_size=1, speculation=make_speculation("ngram", args.k)),
        "draft": Engine(target, tok, max_batch_size=1,
                        speculation=make_speculation("draft", args.k, (draft, tok), tok.vocab_size, tok)),
    }
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eod=True)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(1 if args.quick else args.rounds):
        for name, engine in contenders.items():
            t = time.perf_counter()
            done = [engine.generate([p], params)[0] for p in prompts]
            rates[name].append(sum(len(c.tokens) for c in done) / (time.perf_counter() - t))
            outputs[name] = [c.tokens for c in done]
    identical = all(outputs[name] == outputs["none"] for name in contenders)
    base = statistics.median(rates["none"])
    result = {
        **run_info(load_start),
        "threads": args.threads,
        "workload": {"prompts": len(prompts), "prompt_tokens": 128, "new_tokens": args.new_tokens, "batch": 1,
                     "greedy": True, "k": args.k, "source": f"{tokenize.__name__}.py chunks, BPE 512"},
        "target": {"layers": layers, "hidden": hidden, "params": target.num_parameters(), "init_std": 0.02},
        "draft": {"layers": 1, "hidden": 64, "params": draft.num_parameters()},
        "greedy_identical_to_none": identical,
        "distinct_output_tokens": sorted({len(set(o)) for o in outputs["none"]}),
        "contenders": {
            name: {
                "tokens_per_s_rounds": [round(r, 1) for r in rates[name]],
                "tokens_per_s_median": round(statistics.median(rates[name]), 1),
                "speedup_vs_none": round(statistics.median(rates[name]) / base, 2),
                **({"acceptance_rate": round(e.speculation.acceptance_rate(), 3),
                    "summary": e.speculation.summary()} if (e := contenders[name]).speculation else {}),
            } for name in contenders
        },
    }
    print(json.dumps(result, indent=2))
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")
    assert identical, "speculative greedy output differs from decoding without it"


if __name__ == "__main__":
    main()
