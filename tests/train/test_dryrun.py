"""``mtnlg train --dry-run``: ranks of worlds of thousands built by the real code, and the planner's match.

Each dry run builds one rank of MT-NLG 530B (tp8 pp35 dp8: 2,240 ranks) or GPT-3 175B in this
process over the fake process group; ``mtnlg plan --rank`` must report the same stage, layers and
weight, gradient and optimizer bytes within 1%, and every layout ``plan --search`` ranks must build.
"""

from __future__ import annotations

import json
import shlex

import pytest

from mtnlg.cli import main

MT_NLG = ["--preset", "mt-nlg-530b", "--train.global_batch_size=1920", "--train.micro_batch_size=1"]
GPT3 = ["--preset", "gpt3-175b", "--train.global_batch_size=1536", "--train.micro_batch_size=1"]
LLAMA = ["--preset", "llama3-70b", "--train.global_batch_size=512", "--train.micro_batch_size=1"]
FLAGS = {"mt-nlg-530b": MT_NLG, "gpt3-175b": GPT3, "llama3-70b": LLAMA}
BYTES = ("parameter_bytes", "gradient_bytes", "optimizer_bytes")


def _dry_run(capsys: pytest.CaptureFixture[str], flags: list[str], world: int, rank: int) -> dict:
    assert main(["train", *flags, "--dry-run", "--world-size", str(world), "--rank", str(rank), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> dict | list:
    assert main(["plan", "--gpu", "a100-80gb", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("model", "world", "tp", "pp", "zero", "ranks"), [
    ("mt-nlg-530b", 2240, 8, 35, 1, (0, 1100, 2239)),  # first, a middle and the last stage
    ("mt-nlg-530b", 2240, 8, 35, 3, (7, 2232)),
    ("gpt3-175b", 1024, 8, 8, 2, (0, 600, 1023)),
    ("llama3-70b", 64, 8, 4, 1, (0, 63)),  # grouped-query attention, RMSNorm, SwiGLU, no biases, untied
])
def test_the_planner_predicts_each_ranks_bytes(capsys, model, world, tp, pp, zero, ranks) -> None:
    flags = FLAGS[model]
    layout = [f"--parallel.tp={tp}", f"--parallel.pp={pp}", f"--parallel.zero={zero}"]
    batch = flags[2].split("=")[1]
    for rank in ranks:
        built = _dry_run(capsys, [*flags, *layout], world, rank)
        planned = _plan(capsys, "--preset", model, "--gpus", str(world), "--tp", str(tp), "--pp", str(pp),
                        "--zero", str(zero), "--global-batch", batch, "--rank", str(rank))
        assert built["rank"] == planned["rank"] == rank
        assert (built["stage"], built["layers"]) == (planned["stage"], planned["layers"])
        assert built["coordinates"]["pp"] == rank // (world // pp)
        for name in BYTES:
            assert built[name] == pytest.approx(planned[name], rel=0.01), (rank, name)
    if model == "mt-nlg-530b":  # 105 layers over 35 stages of 3
        assert built["layers"] == [102, 104] and built["layout"]["dp"] == 8


def test_optimizer_state_per_rank_falls_as_one_over_dp(capsys) -> None:
    tiny = ["--preset", "tiny", "--train.global_batch_size=16", "--train.micro_batch_size=1"]
    one = _dry_run(capsys, tiny, 1, 0)
    for dp in (2, 4, 8):
        zero1 = _dry_run(capsys, [*tiny, "--parallel.zero=1"], dp, dp - 1)
        zero2 = _dry_run(capsys, [*tiny, "--parallel.zero=2"], dp, 0)
        assert zero1["optimizer_bytes"] == pytest.approx(one["optimizer_bytes"] / dp, rel=0.01)
        assert zero1["parameter_bytes"] == zero1["gradient_bytes"] == one["parameter_bytes"]
        assert zero2["gradient_bytes"] == pytest.approx(one["gradient_bytes"] / dp, rel=0.01)
        assert [c["op"] for c in zero2["collectives"]] == ["reduce_scatter", "all_gather"]


def test_every_layout_the_search_ranks_builds_as_printed(capsys) -> None:
    plans = _plan(capsys, "--preset", "mt-nlg-530b", "--gpus", "2240", "--global-batch", "1920", "--tokens", "270e9",
                  "--search", "--top", "4")
    assert plans and all(p["train_command"] for p in plans)
    for p in plans:
        command = shlex.split(p["train_command"])
        flags = command[command.index("train") + 1:]
        last = p["layout"]["gpus"] - 1
        built = _dry_run(capsys, flags, p["layout"]["gpus"], last)
        lay = p["layout"]
        assert [built["layout"][k] for k in ("tp", "pp", "dp")] == [lay[k] for k in ("tp", "pp", "dp")]
        planned = _plan(capsys, "--preset", "mt-nlg-530b", "--gpus", "2240", "--global-batch", "1920",
                        "--tp", str(lay["tp"]), "--pp", str(lay["pp"]), "--zero", str(lay["zero"]),
                        "--pp-stages-per-rank", str(lay["virtual_stages"]), "--pp-schedule", lay["schedule"],
                        "--micro-batch-size", str(lay["micro_batch"]), "--rank", str(last))
        for name in BYTES:
            assert built[name] == pytest.approx(planned[name], rel=0.01), (p["train_command"], name)


def test_a_context_parallel_dry_run_lists_the_ring_and_holds_a_ranks_tokens(capsys) -> None:
    """cp=2 x tp=2 x dp=2 (ZeRO-1) of tiny: the ring's send/recv (as ``ring_transfers``, which the cp test counts
    against the real ring) and the gradients' all-reduce over cp; tp traffic and activations of seq_len / 2 tokens."""
    from mtnlg.parallel.context import ring_transfers

    tiny = ["--preset", "tiny", "--train.global_batch_size=4", "--train.micro_batch_size=1", "--parallel.tp=2",
            "--parallel.zero=1"]
    one, two = _dry_run(capsys, tiny, 4, 0), _dry_run(capsys, [*tiny, "--parallel.cp=2"], 8, 5)
    by_group = {(c["op"], c["group"]): c["bytes"] for c in one["collectives"]}
    ring, grads = (c for c in two["collectives"] if c["group"] == "cp")
    steps, nbytes = ring_transfers(256 // 2, 4 // 2, 64, 2, 4, recomputed=False)  # tiny: 4 heads of 64, fp32
    per_step = 4 * 2  # 4 layers x 2 micro-batches (global 4 / micro 1 / dp 2)
    assert (ring["op"], ring["count"], ring["bytes"]) == ("send/recv", steps * per_step, nbytes * per_step)
    assert (grads["op"], grads["bytes"]) == ("all_reduce", by_group["all_reduce", "dp"])  # ZeRO-1: each whole bucket
    assert next(c for c in two["collectives"] if c["group"] == "tp")["bytes"] == by_group["all_reduce", "tp"] / 2
    assert two["activation_bytes"] < one["activation_bytes"] / 2  # s / 2 tokens, and the ring keeps no scores


def test_a_dry_run_names_a_rank_outside_the_world(capsys) -> None:
    assert main(["train", "--preset", "tiny", "--dry-run", "--world-size", "2", "--rank", "2"]) != 0
    assert "--rank 2 is not a rank of --world-size 2" in capsys.readouterr().err


def test_the_activations_of_a_micro_batch_match_the_planners_formula(capsys) -> None:
    """Saved for backward by one micro-batch of a 530B middle stage (fp32: meta tensors do not autocast),
    against Korthikanti et al.'s per-layer formula in its fp32 form; with sequence parallelism torch's
    SequenceParallel also keeps each column-parallel layer's all-gathered input (4 bytes x sbh, 2 a layer)."""
    from mtnlg.config.presets import get_preset
    from mtnlg.planner import make_layout
    from mtnlg.planner.memory import layer_activation_bytes

    cfg = get_preset("mt-nlg-530b")
    for sp in (False, True):
        built = _dry_run(capsys, [*MT_NLG, "--parallel.tp=8", "--parallel.pp=35", "--parallel.zero=1",
                                  f"--parallel.sequence_parallel={str(sp).lower()}"], 2240, 1100)
        lay = make_layout(2240, 8, 35, global_batch=1920, precision="fp32", zero=1, sequence_parallel=sp)
        gathered = 2 * 4 * cfg.seq_len * cfg.hidden if sp else 0
        assert built["activation_bytes"] == pytest.approx(3 * (layer_activation_bytes(cfg, lay) + gathered), rel=0.05)
    fsdp = _dry_run(capsys, [*MT_NLG, "--parallel.tp=8", "--parallel.pp=35"], 2240, 1100)
    assert fsdp["activation_bytes"] is None  # FSDP does not run on meta parameters
