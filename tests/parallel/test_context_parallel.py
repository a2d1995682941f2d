"""Context parallelism (ring attention, causal load balancing) against one process, on one 4-rank gloo world."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mtnlg.config import Config, ConfigError, ModelConfig, ParallelConfig
from mtnlg.model.moe import moe_layers
from mtnlg.parallel.context import (
    check_context_parallel,
    global_positions,
    shard_pipeline_batch,
    shard_sequence,
)
from tests.harness.dist import run_world

GPT_CFG = ModelConfig(vocab_size=128, seq_len=32, n_layers=2, hidden=32, n_heads=4, padded_vocab_multiple=64)
LLAMA_CFG = dataclasses.replace(GPT_CFG, position="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False,
                                tie_embeddings=False)
MOE_CFG = dataclasses.replace(LLAMA_CFG, moe_experts=4, moe_z_loss_coef=1e-3)  # dropless, balance loss + z-loss
CAPACITY_CFG = dataclasses.replace(MOE_CFG, moe_top_k=2, moe_capacity_factor=1.0)  # drops (asserted in the world)


def _documents(rows: int, seq_len: int) -> torch.Tensor:
    """Document ids (rows, seq_len) of packed samples: runs of 1-13 tokens, boundaries anywhere in the chunks."""
    lengths = torch.randint(1, 14, (rows, seq_len), generator=torch.Generator().manual_seed(1))
    starts = torch.zeros(rows, seq_len, dtype=torch.long)
    for r in range(rows):
        for at in lengths[r].cumsum(0).tolist():
            if at < seq_len:
                starts[r, at] = 1
    return starts.cumsum(1)


def _attention_error(cp: int, group: Any, rank: int, documents: bool = False) -> float:
    """Max |ring - full| over the output and the q, k, v gradients, for grouped-query causal attention
    (``documents``: with the block-diagonal mask of packed samples)."""
    from mtnlg.model.gpt import document_mask
    from mtnlg.parallel.context import ring_core

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 32, 8), torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8)
    g = torch.randn(2, 4, 32, 8)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    docs = _documents(2, 32) if documents else None
    mask = {"attn_mask": document_mask(docs)} if docs is not None else {"is_causal": True}
    ref = F.scaled_dot_product_attention(*full, **mask, enable_gqa=True)
    ref.backward(g)
    local = [shard_sequence(t, cp, rank, dim=2).requires_grad_() for t in (q, k, v)]
    out = ring_core(group)(*local, shard_sequence(docs, cp, rank) if docs is not None else None)
    out.backward(shard_sequence(g, cp, rank, dim=2))
    pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(local, full, strict=True)]
    return max((a - shard_sequence(b, cp, rank, dim=2)).abs().max().item() for a, b in pairs)


def _step_error(cfg: ModelConfig, cp: int, cp_group: Any, cp_rank: int, dp: int, dp_rank: int) -> float:
    """One forward/backward of a GPT on cp ranks (x dp) against the whole batch in one process: max error over
    the loss and every gradient, gradients averaged over the dp x cp ranks as their reduction does."""
    import torch.distributed as dist

    from mtnlg.model.gpt import GPT
    from mtnlg.parallel.context import apply_context_parallel

    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2 * dp, cfg.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    ref = GPT(cfg).train()
    ref_loss = ref(x, targets=y)
    ref_loss.backward()
    if cfg.moe_capacity_factor:  # the capacity really drops assignments (stats: assignments, dropped, ...)
        assert all(moe.stats[1] > 0 for _, moe in moe_layers(ref))
    model = apply_context_parallel(GPT(cfg).train(), cp_group)
    model.load_state_dict(ref.state_dict())
    rows = slice(2 * dp_rank, 2 * dp_rank + 2)  # the data-parallel rank's samples; cp ranks share them
    positions = global_positions(cfg.seq_len, cp, cp_rank).unsqueeze(0)
    loss = model(shard_sequence(x[rows], cp, cp_rank), targets=shard_sequence(y[rows], cp, cp_rank),
                 position_ids=positions)
    loss.backward()
    dist.all_reduce(mean := loss.detach().clone())  # every rank holds as many tokens: the mean of the means
    errors = [(mean / (cp * dp) - ref_loss).abs().item()]
    for (name, p), r in zip(model.named_parameters(), ref.parameters(), strict=True):
        dist.all_reduce(p.grad)
        errors.append((p.grad / (cp * dp) - r.grad).abs().max().item())
        assert name  # every parameter compared
    return max(errors)


def _tp_step_error(cfg: ModelConfig, dims: Any, sequence_parallel: bool) -> float:
    """One step of a GPT under cp=2 x tp=2 (``parallelize``, the trainer's ``shard_batch`` and cp averaging)
    against one process: max error over the loss and every gradient, gathered over tp."""
    import copy

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from mtnlg.model.gpt import GPT
    from mtnlg.parallel.context import average_gradients, shard_batch
    from mtnlg.parallel.parallelize import parallelize
    from mtnlg.parallel.utils import loss_context

    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1))
    ref = GPT(cfg).train()
    layout = Config(model=cfg, parallel=ParallelConfig(cp=2, tp=2, sequence_parallel=sequence_parallel))
    model = parallelize(copy.deepcopy(ref), dims, layout)
    ref_loss = ref(tokens[:, :-1], targets=tokens[:, 1:])
    ref_loss.backward()
    inputs, targets, extra, share = shard_batch(tokens[:, :-1], tokens[:, 1:], {}, dims.cp, dims.cp_rank)
    with loss_context(dims):
        loss = model(inputs, targets, **extra) * share
        loss.backward()
    average_gradients(model, dims.cp_group, dims.cp)
    loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
    dist.all_reduce(mean := loss.detach().clone(), group=dims.cp_group)
    errors = [(mean / dims.cp - ref_loss).abs().item()]
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        errors.append((grad - r.grad).abs().max().item())
    return max(errors)


def _packed_step_error(cfg: ModelConfig, cp: int, cp_group: Any, cp_rank: int) -> float:
    """Packed fine-tuning samples (document ids, prompt targets ignored) on cp ranks through ``shard_batch``
    against one process: max error over the loss and every gradient."""
    import torch.distributed as dist

    from mtnlg.model.gpt import GPT
    from mtnlg.model.loss import IGNORE_INDEX
    from mtnlg.parallel.context import apply_context_parallel, shard_batch

    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    y = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    y[:, : cfg.seq_len // 2 - 3] = IGNORE_INDEX  # uneven counted tokens: rank 0 of cp=4 (0-3, 28-31) counts none
    y[:, -5:] = IGNORE_INDEX
    docs = _documents(2, cfg.seq_len)
    ref = GPT(cfg).train()
    ref_loss = ref(x, targets=y, document_ids=docs)
    ref_loss.backward()
    model = apply_context_parallel(GPT(cfg).train(), cp_group)
    model.load_state_dict(ref.state_dict())
    inputs, targets, extra, share = shard_batch(x, y, {"document_ids": docs}, cp, cp_rank)
    loss = model(inputs, targets, **extra) * share
    loss.backward()
    dist.all_reduce(mean := loss.detach().clone(), group=cp_group)
    errors = [(mean / cp - ref_loss).abs().item()]
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        dist.all_reduce(p.grad, group=cp_group)
        errors.append((p.grad / cp - r.grad).abs().max().item())
    return max(errors)


def _saved_over_planned(cp: int, cp_group: Any, recompute: str) -> float:
    """One GPT block's bytes saved for backward on a cp rank (a saved-tensor probe), over the planner's
    ``layer_activation_bytes`` for that layout (fp32, 2 samples of 128 tokens)."""
    from mtnlg.model.gpt import GPT
    from mtnlg.parallel.context import apply_context_parallel
    from mtnlg.planner import make_layout
    from mtnlg.planner.memory import layer_activation_bytes
    from tests.planner.test_plan import saved_bytes

    cfg = ModelConfig(vocab_size=500, seq_len=128, n_layers=2, hidden=128, n_heads=4, recompute=recompute)
    block = apply_context_parallel(GPT(cfg).train(), cp_group).view([0], embeddings=False, head=False)
    x = torch.randn(2, cfg.seq_len // cp, cfg.hidden, requires_grad=True)
    _, saved = saved_bytes(block, lambda: block(x))
    lay = make_layout(cp, cp=cp, micro_batch=2, global_batch=2, precision="fp32")
    return saved / layer_activation_bytes(cfg, lay, recompute)


def _counting_the_ring(cfg: ModelConfig, group: Any, rank: int) -> tuple[float, bool]:
    """``_step_error`` of ``cfg`` on cp=4, and whether the ring's steps and bytes sent (counted at
    ``_ring_step``) are what ``ring_transfers`` (the dry run's figure) predicts for its layers."""
    import mtnlg.parallel.context as context

    sent, real = [0, 0], context._ring_step

    def counting(group: Any, *tensors: torch.Tensor) -> Any:
        sent[0] += 1
        sent[1] += sum(t.numel() * t.element_size() for t in tensors)
        return real(group, *tensors)

    context._ring_step = counting
    try:
        error = _step_error(cfg, 4, group, rank, 1, 0)
    finally:
        context._ring_step = real
    steps, nbytes = context.ring_transfers(2 * cfg.seq_len // 4, cfg.n_heads, cfg.head_dim, 4, 4,
                                           cfg.recompute != "none")
    return error, sent == [steps * cfg.n_layers, nbytes * cfg.n_layers]


def _expert_parallel() -> dict[str, Any]:
    """Two steps of the real trainer under cp=2 x ep=2 (dp=2, FSDP), capacity routing with balance loss and
    expert bias: what ``test_expert_parallel`` compares with one process."""
    from tests.harness.training import world_dims
    from tests.parallel.test_expert_parallel import _config, _train

    cfg = _config("capacity", cp=2, ep=2)
    return _train(cfg, world_dims(cfg, 4))


def _world() -> dict[str, Any]:
    import torch.distributed as dist

    from mtnlg.parallel.dims import init_distributed

    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # cp=2 groups (all ranks create every group)
    cp2, cp2_rank = pairs[rank // 2], rank % 2
    cp_tp = init_distributed(ParallelConfig(cp=2, tp=2))  # the mesh: cp ranks {0, 2} and {1, 3}, tp {0, 1}, {2, 3}
    selective, ring_as_predicted = _counting_the_ring(dataclasses.replace(LLAMA_CFG, recompute="selective"),
                                                      dist.group.WORLD, rank)
    return {
        "llama cp=4 selective": selective,
        "ring transfers as predicted": ring_as_predicted,
        "trainer cp=2 x ep=2": _expert_parallel(),
        "llama cp=2 x tp=2": _tp_step_error(LLAMA_CFG, cp_tp, sequence_parallel=False),
        "gpt cp=2 x tp=2 sequence parallel": _tp_step_error(GPT_CFG, cp_tp, sequence_parallel=True),
        "attention cp=4": _attention_error(4, dist.group.WORLD, rank),
        "attention cp=2": _attention_error(2, cp2, cp2_rank),
        "documents attention cp=4": _attention_error(4, dist.group.WORLD, rank, documents=True),
        "documents attention cp=2": _attention_error(2, cp2, cp2_rank, documents=True),
        "llama packed samples cp=4": _packed_step_error(LLAMA_CFG, 4, dist.group.WORLD, rank),
        "gpt packed samples cp=2": _packed_step_error(GPT_CFG, 2, cp2, cp2_rank),
        "gpt cp=2 x dp=2": _step_error(GPT_CFG, 2, cp2, cp2_rank, 2, rank // 2),
        "llama cp=2 x dp=2": _step_error(LLAMA_CFG, 2, cp2, cp2_rank, 2, rank // 2),
        "moe cp=4": _step_error(MOE_CFG, 4, dist.group.WORLD, rank, 1, 0),
        "moe capacity cp=4": _step_error(CAPACITY_CFG, 4, dist.group.WORLD, rank, 1, 0),
        "saved / planned cp=4": _saved_over_planned(4, dist.group.WORLD, "none"),
        "saved / planned cp=4 selective": _saved_over_planned(4, dist.group.WORLD, "selective"),
    }


@pytest.fixture(scope="module")
def errors() -> list[dict[str, Any]]:
    return run_world(_world, 4, timeout=120)


@pytest.mark.parametrize("case", ["attention cp=4", "attention cp=2", "documents attention cp=4",
                                  "documents attention cp=2", "llama packed samples cp=4", "gpt packed samples cp=2",
                                  "gpt cp=2 x dp=2", "llama cp=2 x dp=2", "moe cp=4", "moe capacity cp=4",
                                  "llama cp=4 selective", "llama cp=2 x tp=2", "gpt cp=2 x tp=2 sequence parallel"])
def test_context_parallel_equals_one_process(errors: list[dict[str, float]], case: str) -> None:
    """Ring attention's output and gradients, and a training step's loss and every gradient, within 1e-5 of
    full attention / the whole sequence in one process (fp32, causal; with packed documents' masks)."""
    assert max(rank[case] for rank in errors) < 1e-5


def test_cp2_x_ep2_trains_as_one_process(errors: list[dict[str, Any]]) -> None:
    """Expert parallelism while the sequence is split: the trainer's losses, first gradients, final weights and
    expert biases equal one process's (the capacity's drops and the balance loss counted over whole sequences)."""
    from tests.parallel.test_expert_parallel import assert_trained_as_one_process

    assert_trained_as_one_process([rank["trainer cp=2 x ep=2"] for rank in errors], "capacity")


def test_the_ring_sends_what_the_dry_run_lists(errors: list[dict[str, Any]]) -> None:
    """``ring_transfers`` (``mtnlg train --dry-run``'s cp send/recv line) counts the steps and bytes ring
    attention really sends, selective recomputation's second forward ring included."""
    assert all(rank["ring transfers as predicted"] for rank in errors)


def test_a_ranks_saved_activations_match_the_planner(errors: list[dict[str, float]]) -> None:
    """The planner's cp memory model (s / cp tokens; ring attention's fp32 output and log-sum-exp, no
    scores) within 3 % of what one block saves on each rank, with and without selective recomputation."""
    for rank in errors:
        assert rank["saved / planned cp=4"] == pytest.approx(1.0, abs=0.03)
        assert rank["saved / planned cp=4 selective"] == pytest.approx(1.0, abs=0.03)


def test_load_balancing_gives_each_rank_a_head_and_its_mirrored_tail() -> None:
    assert global_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert global_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    whole = torch.cat([global_positions(16, 4, r) for r in range(4)])
    assert sorted(whole.tolist()) == list(range(16))


def test_context_parallel_rules_name_their_fields() -> None:
    with pytest.raises(ConfigError, match=r"model.seq_len=30 must be divisible by 2 \* parallel.cp = 4"):
        check_context_parallel(2, 30, 0.0)
    with pytest.raises(ConfigError, match="model.dropout=0.1 with parallel.cp=2"):
        check_context_parallel(2, 32, 0.1)
    with pytest.raises(ConfigError, match="parallel.cp > 1 with parallel.pp > 1 takes pretraining batches only"):
        shard_pipeline_batch(torch.zeros(2, 3, 33, dtype=torch.long), 2, 0)
