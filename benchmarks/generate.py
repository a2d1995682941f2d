"""Decode throughput: mtnlg (fp32, int8, int4) vs Hugging Face ``generate``, same gpt2-small weights.

One random gpt2-small (124M parameters) is saved as an mtnlg checkpoint and exported with
``mtnlg.checkpoint.convert.to_hf`` into a ``GPT2LMHeadModel`` (nothing is downloaded), so all three run the
same weights. Each run is greedy decoding of 128 new tokens after a 32-token prompt, at batch 1
and batch 8, end of document ignored; tokens/s counts new tokens over the whole call (prefill
included). mtnlg fp32 runs the weight layout its commands pick: (in, out) + addmm for one
sequence at a time (``mtnlg generate``), oneDNN's prepacked one for batches (``mtnlg serve``).
On a shared, noisy machine the contenders alternate: every round times each once,
and the medians are compared.

The memory-bandwidth bound: decoding one token (at batch 1) reads every weight once, so
tokens/s <= bandwidth / weight bytes. Bandwidth is measured here with ``torch`` copies of a
256 MiB buffer (bytes read + written per second).

Server scaling: the fp32 engine behind ``mtnlg serve``'s app (uvicorn on 127.0.0.1), 1 client vs
8 concurrent clients, each sending requests of 32 new tokens one after another.

int4 (``mtnlg.generate.quantize.int4``: groups of 128 input columns, torch's int4 CPU kernel) runs
beside int8 in every round.

    .venv/bin/python benchmarks/generate.py [--threads N] [--rounds 3] [--quick] [--no-server]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from run_info import run_info

from mtnlg.checkpoint.convert import to_hf
from mtnlg.checkpoint.model import save_model
from mtnlg.config import Config
from mtnlg.config.presets import get_preset
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.generate.quantize import prepare_for_inference
from mtnlg.model.gpt import GPT

RESULTS = Path(__file__).parent / "results" / "generate.json"


def copy_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """Bytes read + written per second by a large tensor copy (best of ``repeats``)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: the weights of every layer but the embeddings, of which only
    a row is read (a tied output layer is counted, as the output layer)."""
    tensors = {
        id(t): t
        for m in model.modules()
        if not isinstance(m, torch.nn.Embedding)
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if t is not None
    }
    return sum(t.numel() * t.element_size() for t in tensors.values())


def hf_model(model: GPT, cfg: Config, workdir: Path):
    from transformers import GPT2LMHeadModel

    save_model(workdir / "ckpt", model, cfg)
    to_hf(workdir / "ckpt", workdir / "hf")
    hf = GPT2LMHeadModel.from_pretrained(workdir / "hf", torch_dtype=torch.float32, attn_implementation="sdpa")
    hf.generation_config.eos_token_id = None  # decode the full budget, like ignore_eod
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def timed(fn: Callable[[], int]) -> float:
    """Tokens per second of ``fn`` (which returns the number of new tokens it produced)."""
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def contenders(engines: dict[str, Engine], hf, prompts: torch.Tensor, new: int) -> dict[str, Callable[[], int]]:
    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eod=True)

    def mtnlg(engine: Engine) -> Callable[[], int]:
        return lambda: sum(len(c.tokens) for c in engine.generate(prompts.tolist(), params))

    def hugging_face() -> int:
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False)
        return (out.shape[1] - prompts.shape[1]) * prompts.shape[0]

    return {**{name: mtnlg(e) for name, e in engines.items()}, "hf_generate": hugging_face}


def decode_benchmark(engines_for: Callable[[int], dict[str, Engine]], hf, vocab: int, args: argparse.Namespace) -> dict:
    results: dict = {}
    for batch in (1, 8):
        engines = engines_for(batch)
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        runs = contenders(engines, hf, prompts, args.new_tokens)
        warm = contenders(engines, hf, prompts, 4)
        for fn in warm.values():
            fn()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                samples[name].append(timed(fn))
        results[f"batch_{batch}"] = {
            name: {"tokens_per_s": statistics.median(v), "runs": [round(x, 2) for x in v]}
            for name, v in samples.items()
        }
        print(f"batch {batch}: " + ", ".join(f"{k} {statistics.median(v):.1f} tok/s" for k, v in samples.items()))
    return results


def greedy_outputs_match(engine: Engine, hf, vocab: int) -> bool:
    prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(99))
    ours = engine.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eod=True))
    with torch.inference_mode():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    return ours[0].tokens == theirs[0, 32:].tolist()


def server_benchmark(engine: Engine, vocab: int, args: argparse.Namespace) -> dict:
    import httpx
    import uvicorn

    from mtnlg.serve.app import create_app
    from mtnlg.serve.connection import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine)
    server = uvicorn.Server(uvicorn_config(app, app.state.limits, log_level="warning"))  # as `mtnlg serve` runs
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"

    def client(seed: int) -> int:
        gen = torch.Generator().manual_seed(seed)
        done = 0
        with httpx.Client(timeout=600) as http:
            for _ in range(args.server_requests):
                prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
                body = {"prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
                done += http.post(url, json=body).json()["usage"]["completion_tokens"]
        return done

    out = {}
    try:
        client(0)  # warm up
        for clients in (1, 8):
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(client, range(1, clients + 1)))
            out[f"clients_{clients}_tokens_per_s"] = tokens / (time.perf_counter() - t)
            print(f"server, {clients} client(s): {out[f'clients_{clients}_tokens_per_s']:.1f} tok/s")
    finally:
        server.should_exit = True
        thread.join(30)
    out["speedup_8_vs_1"] = out["clients_8_tokens_per_s"] / out["clients_1_tokens_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each contender (median reported)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--server-requests", type=int, default=3, help="requests per client in the server test")
    p.add_argument("--quick", action="store_true", help="a 2-layer model and few tokens (smoke test)")
    p.add_argument("--no-server", action="store_true", help="skip the server scaling part")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_cfg = get_preset("gpt2-small")
    if args.quick:
        model_cfg.n_layers, args.new_tokens, args.rounds, args.server_requests = 2, 16, 1, 1
    cfg = Config(model=model_cfg)
    model = GPT(model_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(model, cfg, Path(tmp))
    int8 = prepare_for_inference(copy.deepcopy(model), "int8")
    int4 = prepare_for_inference(copy.deepcopy(model), "int4")
    served = Engine(prepare_for_inference(copy.deepcopy(model)))  # `mtnlg serve`'s layout (batches)

    def engines_for(batch: int) -> dict[str, Engine]:
        """What `mtnlg generate` (one sequence) or `mtnlg serve` (batches) run, plus nn.Linear as an ablation."""
        fp32 = served if batch > 1 else Engine(prepare_for_inference(copy.deepcopy(model), max_batch_size=1))
        return {"mtnlg_fp32": fp32, "mtnlg_int8": Engine(int8), "mtnlg_int4": Engine(int4),
                "mtnlg_fp32_nn_linear": Engine(model)}
    bandwidth = copy_bandwidth()
    bytes_fp32, bytes_int8, bytes_int4 = weight_bytes(model), weight_bytes(int8), weight_bytes(int4)
    result = {
        "model": f"gpt2-small (random weights, vocab padded to {model_cfg.padded_vocab_size})",
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "prompt_tokens": args.prompt_len,
        "new_tokens": args.new_tokens,
        "greedy_outputs_match_hf": greedy_outputs_match(served, hf, model_cfg.vocab_size),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "weight_bytes": {"fp32": bytes_fp32, "int8": bytes_int8, "int4": bytes_int4},
        "bandwidth_bound_tokens_per_s_batch_1": {"fp32": bandwidth / bytes_fp32, "int8": bandwidth / bytes_int8,
                                                 "int4": bandwidth / bytes_int4},
        "decode": decode_benchmark(engines_for, hf, model_cfg.vocab_size, args),
        "server_fp32": None if args.no_server else server_benchmark(served, model_cfg.vocab_size, args),
        "run": run_info(load_start),
    }
    b1, b8 = result["decode"]["batch_1"], result["decode"]["batch_8"]
    speed = {k: v["tokens_per_s"] for k, v in b1.items()}
    result["ratios"] = {
        "fp32_vs_hf_batch_1": speed["mtnlg_fp32"] / speed["hf_generate"],
        "fp32_vs_hf_batch_8": b8["mtnlg_fp32"]["tokens_per_s"] / b8["hf_generate"]["tokens_per_s"],
        "int8_vs_fp32_batch_1": speed["mtnlg_int8"] / speed["mtnlg_fp32"],
        "int4_vs_fp32_batch_1": speed["mtnlg_int4"] / speed["mtnlg_fp32"],
        "int4_vs_int8_batch_1": speed["mtnlg_int4"] / speed["mtnlg_int8"],
        "int4_vs_fp32_batch_8": b8["mtnlg_int4"]["tokens_per_s"] / b8["mtnlg_fp32"]["tokens_per_s"],
        "fp32_vs_bandwidth_bound_batch_1": speed["mtnlg_fp32"] / (bandwidth / bytes_fp32),
    }
    print(json.dumps(result["ratios"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
