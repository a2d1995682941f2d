"""Serving: today's engine (contiguous KV cache) vs the block KV cache and each of its features.

Every configuration serves the same random model through ``mtnlg serve``'s app (uvicorn on
127.0.0.1) in a process of its own (so its peak RSS is its own); the clients run in this process,
streaming, and time each request's first token. Two fixed request mixes (token-id prompts, greedy, end of
document ignored):

- ``shared``: every request is one 256-token system prompt + a 8-32-token question, 16 new
  tokens; 1, 4 and 16 clients, each sending ``--requests`` requests one after another;
- ``long_short``: one client sends 1000-token prompts (16 new tokens) back to back while 4 clients
  send 16-token prompts (16 new tokens); reported: the short requests' time to first token.

Configurations: ``contiguous`` (today's engine), ``paged`` (blocks only), ``paged+prefix``,
``paged+chunk`` (``--prefill-chunk 64``), ``paged+prefix+chunk`` (all). Each run checks that
every configuration returned the contiguous engine's tokens. With ``--rounds N`` the
configurations alternate (every round runs each once, the order reversed every other round, so
that a change in the machine's load falls on all of them) and each figure is the median of its
rounds; every round's is kept too, with the load average when each configuration started.

    .venv/bin/python benchmarks/serve.py [--threads 1] [--requests 2] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from run_info import run_info

RESULTS = Path(__file__).parent / "results" / "serve.json"
CONFIGS = {
    "contiguous": {"kv_cache": "contiguous"},
    "paged": {"kv_cache": "paged", "prefix_cache": False},
    "paged+prefix": {"kv_cache": "paged"},
    "paged+chunk": {"kv_cache": "paged", "prefix_cache": False, "prefill_chunk": 64},
    "paged+prefix+chunk": {"kv_cache": "paged", "prefill_chunk": 64},
}
VOCAB, SYSTEM_LEN, LONG_LEN, NEW = 4096, 256, 1000, 16
KV_CACHE_BYTES = 64 << 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def make_engine(options: dict, args: argparse.Namespace) -> object:
    """A fresh engine over the benchmark's random model (the same seeded weights each time)."""
    import torch
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    from mtnlg.config import ModelConfig
    from mtnlg.data.tokenizer import EOD_TOKEN, Tokenizer
    from mtnlg.generate.engine import Engine
    from mtnlg.model.gpt import GPT

    # one word per id, so that the streamed logprobs name each token (its string is its id)
    tokenizer = Tokenizer(HFTokenizer(WordLevel({**{f"t{i}": i for i in range(VOCAB - 1)}, EOD_TOKEN: VOCAB - 1},
                                                unk_token="t0")))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, seq_len=1024, n_layers=args.layers, hidden=args.hidden, n_heads=4,
                      init_std=0.1)
    kv = {"kv_cache_bytes": KV_CACHE_BYTES, **options} if options["kv_cache"] == "paged" else options
    return Engine(GPT(cfg).eval(), tokenizer, max_batch_size=16, **kv)


def serve(options: dict, args: argparse.Namespace) -> tuple[str, object]:
    """Start the app over a fresh engine; returns its URL and server."""
    import uvicorn

    from mtnlg.serve.app import create_app
    from mtnlg.serve.connection import uvicorn_config

    engine = make_engine(options, args)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine, batch_wait_s=0.005, max_queued_sequences=1024)
    server = uvicorn.Server(uvicorn_config(app, app.state.limits, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def ask(http: object, url: str, prompt: list[int]) -> tuple[float, list[int]]:
    """One streamed greedy request: (seconds to its first token, its tokens)."""
    body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    t0, first, tokens = time.perf_counter(), None, []
    with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("logprobs") and choice["logprobs"].get("tokens"):
                    first = first if first is not None else time.perf_counter() - t0
                    tokens += choice["logprobs"]["tokens"]
    return first if first is not None else float("nan"), tokens


def run_clients(url: str, prompts_per_client: list[list[list[int]]]) -> dict:
    """Each client sends its prompts one after another; all clients at once."""
    import httpx

    def client(prompts: list[list[int]]) -> list[tuple[float, list[int]]]:
        with httpx.Client(timeout=900) as http:
            return [ask(http, url, p) for p in prompts]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts_per_client)) as pool:
        results = list(pool.map(client, prompts_per_client))
    wall = time.perf_counter() - t0
    flat = [r for rs in results for r in rs]
    ttft = [r[0] for r in flat]
    return {"tokens_per_s": sum(len(r[1]) for r in flat) / wall, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99), "wall_s": wall, "requests": len(flat),
            "outputs": [r[1] for rs in results for r in rs]}


def batcher_only(name: str, args: argparse.Namespace, prompts: list[list[list[int]]]) -> dict:
    """The clients' ``prompts`` (one list per client, sent one after another) through the server's
    batcher over a fresh engine, in this process: no HTTP, no client threads, no token text; what
    the engine and its scheduling make of the mix."""
    import asyncio

    from mtnlg.generate.engine import SamplingParams
    from mtnlg.serve.batcher import Batcher

    engine = make_engine(dict(CONFIGS[name]), args)
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eod=True, logprobs=0)
    batcher = Batcher(engine, batch_wait_s=0.005)
    batcher.start()

    async def client(mine: list[list[int]]) -> list[tuple[float, int]]:
        out = []
        for prompt in mine:
            t0, first, tokens, done = time.perf_counter(), None, 0, False
            job = batcher.submit([engine.request(prompt, params)], stream=True)
            while not done:
                for _, event in await job.events.get():
                    tokens += event.token is not None
                    first = time.perf_counter() - t0 if first is None and tokens else first
                    done = event.finish_reason is not None
            out.append((first, tokens))
        return out

    async def everyone() -> list[list[tuple[float, int]]]:
        await client([[1, 2, 3]])  # warm up the first forward
        return await asyncio.gather(*(client(p) for p in prompts))

    t0 = time.perf_counter()
    try:
        results = [r for rs in asyncio.run(everyone()) for r in rs]
    finally:
        batcher.stop()
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    return {"tokens_per_s": sum(r[1] for r in results) / wall, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99), "wall_s": wall, "requests": len(results)}


def serve_forever(name: str, args: argparse.Namespace) -> None:
    """The child process: serve configuration ``name``, print the URL, stop when stdin closes."""
    url, server = serve(dict(CONFIGS[name]), args)
    print(url, flush=True)
    sys.stdin.read()
    server.should_exit = True


def kv_metrics(url: str) -> dict[str, float]:
    """The block pool's gauges from /metrics (none for the contiguous cache)."""
    import httpx

    text = httpx.get(f"{url}/metrics").text
    found = (line.split() for line in text.splitlines() if line.startswith(("mtnlg_kv_", "mtnlg_prefix_")))
    return {parts[0]: float(parts[1]) for parts in found}


def one_config(name: str, args: argparse.Namespace) -> dict:
    """Serve ``name`` in a child process (its own peak RSS) and run both mixes against it from here."""
    cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads), "--layers", str(args.layers),
           "--hidden", str(args.hidden)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    rng = random.Random(0)
    system = [rng.randrange(VOCAB) for _ in range(SYSTEM_LEN)]
    out: dict = {"shared": {}}
    try:
        run_clients(url, [[[1, 2, 3]]])  # warm up the first forward
        for clients in args.clients:
            prompts = [[system + [rng.randrange(VOCAB) for _ in range(rng.randrange(8, 33))]
                        for _ in range(args.requests)] for _ in range(clients)]
            out["shared"][str(clients)] = run_clients(url, prompts)
        longs = [[rng.randrange(VOCAB) for _ in range(LONG_LEN)] for _ in range(args.long_requests)]
        shorts = [[[rng.randrange(VOCAB) for _ in range(16)] for _ in range(args.short_requests)] for _ in range(4)]
        long_result: dict = {}
        thread = threading.Thread(target=lambda: long_result.update(run_clients(url, [longs])))
        thread.start()
        time.sleep(0.05)  # the first long prompt is being prefilled
        out["long_short"] = {"short": run_clients(url, shorts)}
        thread.join()
        out["long_short"]["long"] = long_result
        out["kv_metrics"] = kv_metrics(url)
    finally:
        proc.stdin.close()
        _, _, usage = os.wait4(proc.pid, 0)
    out["peak_rss_bytes"] = usage.ru_maxrss * 1024
    out["batcher_only"] = batcher_only(name, args, prompts)  # the largest client count's prompts again
    return out


def median_of(rounds: list) -> object:
    """The rounds' results merged: numbers by their median, lists (tokens) from the first round."""
    first = rounds[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in rounds]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(rounds)
    return first


def summary(results: dict) -> dict:
    """Ratios against today's engine, and whether each configuration returned its tokens."""
    base = results["contiguous"]
    out = {}
    for name, r in results.items():
        same = all(r["shared"][c]["outputs"] == base["shared"][c]["outputs"] for c in r["shared"])
        same &= r["long_short"]["short"]["outputs"] == base["long_short"]["short"]["outputs"]
        top = max(r["shared"], key=int)
        out[name] = {
            "same_tokens_as_contiguous": same,
            f"shared_{top}_clients_throughput_x": r["shared"][top]["tokens_per_s"]
            / base["shared"][top]["tokens_per_s"],
            f"batcher_only_{top}_clients_throughput_x": r["batcher_only"]["tokens_per_s"]
            / base["batcher_only"]["tokens_per_s"],
            "short_ttft_p99_under_long_x": r["long_short"]["short"]["ttft_p99_s"]
            / base["long_short"]["short"]["ttft_p99_s"],
            "peak_rss_mib": r["peak_rss_bytes"] / 2**20,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each server")
    p.add_argument("--requests", type=int, default=2, help="requests per client in the shared-prompt mix")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--long-requests", type=int, default=4)
    p.add_argument("--short-requests", type=int, default=4, help="per short client, under the long prompts")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each figure is their median")
    p.add_argument("--layers", type=int, default=2, help="the random model's layers")
    p.add_argument("--hidden", type=int, default=128, help="the random model's width (4 heads)")
    p.add_argument("--quick", action="store_true", help="1 and 4 clients, 1 request each (smoke test)")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # the child process
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests, args.long_requests, args.short_requests, args.rounds = [1, 4], 1, 1, 1, 1
    if args.one:
        serve_forever(args.one, args)
        return
    load_start = os.getloadavg()
    rounds: dict[str, list[dict]] = {name: [] for name in args.configs}
    seconds: dict[str, list[float]] = {name: [] for name in args.configs}
    loads: dict[str, list[float]] = {name: [] for name in args.configs}
    for i in range(args.rounds):  # alternating: each configuration once a round, in a fresh process
        for name in args.configs if i % 2 == 0 else args.configs[::-1]:
            loads[name].append(os.getloadavg()[0])
            t0 = time.perf_counter()
            rounds[name].append(one_config(name, args))
            seconds[name].append(time.perf_counter() - t0)
            r = rounds[name][-1]
            shared, short = r["shared"][str(max(args.clients))], r["long_short"]["short"]
            print(f"{name:>20} (round {i + 1}, load {loads[name][-1]:.1f}): {max(args.clients)} clients "
                  f"{shared['tokens_per_s']:6.1f} tok/s, ttft p50 {shared['ttft_p50_s']:.2f}s p99 "
                  f"{shared['ttft_p99_s']:.2f}s; short under long: ttft p50 {short['ttft_p50_s']:.2f}s p99 "
                  f"{short['ttft_p99_s']:.2f}s; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB "
                  f"({seconds[name][-1]:.0f}s)", flush=True)
    results = {name: median_of(rs) for name, rs in rounds.items()}
    ratios = summary(results) if "contiguous" in results else {}
    if "contiguous" in rounds:  # every round's tokens, and its headline ratio (the same load for both)
        top, base = str(max(args.clients)), rounds["contiguous"]
        for name, r in ratios.items():
            r["same_tokens_every_round"] = all(summary({"contiguous": base[0], name: x})[name]
                                               ["same_tokens_as_contiguous"] for x in rounds[name])
            r[f"shared_{top}_clients_throughput_x_rounds"] = [x["shared"][top]["tokens_per_s"] / b["shared"][top][
                "tokens_per_s"] for x, b in zip(rounds[name], base, strict=True)]
    for name, r in ratios.items():
        print(f"{name:>20}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})}")
    for r in (*results.values(), *(x for rs in rounds.values() for x in rs)):  # tokens compared: keep the file small
        for part in (*r["shared"].values(), *r["long_short"].values()):
            part.pop("outputs", None)
    record = {**run_info(load_start), "threads": args.threads, "args": {k: v for k, v in vars(args).items()
              if k not in ("out", "one")}, "model": f"random GPT, {args.layers} layers, hidden {args.hidden}, 4 heads, "
              "vocab 4096, context 1024", "kv_cache_bytes": KV_CACHE_BYTES, "seconds": seconds, "load_at_start": loads,
              "results": results, "vs_contiguous": ratios, "rounds": rounds}
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
