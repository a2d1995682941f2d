"""Peak memory of HF conversion (``mtnlg convert --from-hf`` and ``--to-hf``) against the model's size.

Builds a random-weight Llama-style HF directory (sharded safetensors) with transformers, then runs each
conversion in a fresh subprocess that samples its own /proc/self/status every 20 ms: peak RssAnon (memory
the process owns) and peak VmRSS (which also counts clean pages of the memory-mapped input files, which
the kernel may drop at any time). The imports' own footprint is measured alone and reported beside them.

    .venv/bin/python benchmarks/convert_memory.py [--hidden 1536 --layers 16] [--out benchmarks/results/convert.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_info import run_info

CHILD = r"""
import sys, threading, time
peak = {"RssAnon": 0, "VmRSS": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in peak:
                peak[key] = max(peak[key], int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
import torch, transformers  # noqa: F401  (what every case imports, measured by "imports")
from mtnlg.checkpoint.convert import from_hf, to_hf
time.sleep(0.1)
start = time.perf_counter()
case, src, dst = sys.argv[1:4]
if case == "from_hf":
    from_hf(src, dst)
elif case == "to_hf":
    to_hf(src, dst)
seconds = time.perf_counter() - start
time.sleep(0.1)
print({"peak_rss_anon_mb": peak["RssAnon"] / 1024, "peak_vm_rss_mb": peak["VmRSS"] / 1024, "seconds": seconds})
"""


def _run(case: str, src: Path, dst: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(src), str(dst)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return eval(out.strip().splitlines()[-1])  # the child's one dict literal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/convert.json")
    args = parser.parse_args()
    load = os.getloadavg()
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=args.hidden, num_hidden_layers=args.layers, max_position_embeddings=4096,
            num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 512,
            intermediate_size=8 * args.hidden // 3 // 256 * 256,
        )
        with torch.device("meta"):
            params = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
        model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(root / "hf", max_shard_size="500MB")
        del model
        shards = len(list((root / "hf").glob("*.safetensors")))
        results = {"imports": _run("imports", root, root)}
        t = time.perf_counter()
        results["from_hf"] = _run("from_hf", root / "hf", root / "ckpt")
        results["to_hf"] = _run("to_hf", root / "ckpt", root / "back")
        print(f"{params / 1e9:.2f}B parameters, {4 * params / 2**20:.0f} MB in fp32, {shards} shards; "
              f"conversions took {time.perf_counter() - t:.1f} s")
    for case, r in results.items():
        print(f"{case:8s} peak RssAnon {r['peak_rss_anon_mb']:7.0f} MB, peak VmRSS {r['peak_vm_rss_mb']:7.0f} MB, "
              f"{r['seconds']:.1f} s")
    record = {"benchmark": "convert_memory", "parameters": params, "model_mb_fp32": 4 * params / 2**20,
              "shards": shards, "results": results, **run_info(load)}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
