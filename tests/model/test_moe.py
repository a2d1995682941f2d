"""The mixture-of-experts MLP in one process: routing, capacity, balancing losses, the bias update,
the grouped experts against a per-token loop, accounting and training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mtnlg.config import ConfigError, ModelConfig
from mtnlg.model.counts import flops_per_token, parameter_count
from mtnlg.model.gpt import GPT
from mtnlg.model.moe import MoE, take_statistics, update_expert_bias

CFG = ModelConfig(vocab_size=120, seq_len=16, n_layers=2, hidden=32, n_heads=4, padded_vocab_multiple=64,
                  moe_experts=4, moe_top_k=2, moe_every=2)


def _moe(**changes: object) -> MoE:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, **changes))
    moe = model.blocks["1"].mlp
    assert isinstance(moe, MoE)
    return moe


def _expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e as a dense MLP."""
    w = moe.experts
    h = F.gelu(F.linear(x, w.fc_in_weight[e], w.fc_in_bias[e]), approximate="tanh")
    return F.linear(h, w.fc_out_weight[e], w.fc_out_bias[e])


def _routed_counts(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Tokens each expert ran in ``moe(x)``."""
    seen = []
    handle = moe.experts.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    moe(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_dropless_output_equals_a_per_token_loop_over_its_top_k_experts(score: str) -> None:
    moe = _moe(moe_score=score).eval()
    x = torch.randn(2, 8, 32)
    tokens = x.reshape(-1, 32)
    gates, experts, scores, _ = moe.router(tokens)
    assert experts.shape == (16, 2) and (experts[:, 0] != experts[:, 1]).all()  # k distinct experts per token
    assert torch.equal(experts, scores.topk(2, dim=-1).indices)
    torch.testing.assert_close(gates.sum(-1), torch.ones(16))  # renormalised over the chosen k
    want = torch.stack([sum(gates[i, j] * _expert(moe, int(experts[i, j]), tokens[i]) for j in range(2))
                        for i in range(16)])
    torch.testing.assert_close(moe(x).reshape(-1, 32), want, rtol=1e-5, atol=1e-6)
    assert _routed_counts(moe, x).sum() == 16 * 2  # dropless: every assignment runs


def test_capacity_drops_the_assignments_past_it_in_priority_order() -> None:
    moe = _moe(moe_capacity_factor=1.0, moe_top_k=1).eval()
    with torch.no_grad():  # a router that prefers expert 0 for every token
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 5.0
    x = torch.randn(1, 16, 32)
    x[..., 0] = x[..., 0].abs() + 1
    capacity = moe.capacity(16)
    assert capacity == 4  # ceil(1.0 x 16 x 1 / 4)
    counts = _routed_counts(moe, x)
    assert counts.tolist() == [4, 0, 0, 0]
    out = moe(x)[0]
    gates, _, _, _ = moe.router(x[0])
    want = torch.stack([gates[i, 0] * _expert(moe, 0, x[0, i]) for i in range(4)])  # the first 4 tokens win
    torch.testing.assert_close(out[:4], want, rtol=1e-5, atol=1e-6)
    assert (out[4:] == 0).all()  # dropped tokens: only the residual carries them
    moe.train()
    moe(x)
    assert take_statistics(moe)[""][-3].item() == 12  # dropped assignments counted


@pytest.mark.parametrize("changes", [{"moe_capacity_factor": 1.0},
                                     {"mlp": "swiglu", "bias": False, "moe_z_loss_coef": 1e-3}])
def test_padded_batched_layout_equals_the_sorted_grouped_layout_forward_and_backward(
        changes: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's padded bmm layout (gathers both ways) against the sorted grouped one: output and every gradient."""
    results = []
    for padded in (True, False):
        moe = _moe(**changes).train()
        monkeypatch.setattr(MoE, "_padded", lambda self, p=padded: p)
        with torch.no_grad():
            moe.router.gate.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
        x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
        out = moe(x)
        (out.square().sum() + moe.take_aux_loss()).backward()
        results.append([out, x.grad, *(p.grad for p in moe.parameters())])
        assert moe.stats[1] > 0 if changes.get("moe_capacity_factor") else moe.stats[1] == 0  # dropped
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_aux_loss_is_its_minimum_for_a_uniform_router_and_larger_when_skewed() -> None:
    moe = _moe(moe_z_loss_coef=0.0).train()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        moe.router.gate.weight.zero_()  # every expert equally likely
    moe(x)
    torch.testing.assert_close(moe.take_aux_loss(), torch.tensor(0.01 * 1.0))  # coef x E sum f P = coef x 1
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1)
        moe.router.gate.weight[1] += 3 * x.reshape(-1, 32).mean(0)  # skewed towards expert 1
    moe(x)
    assert moe.take_aux_loss() > 0.01
    assert moe.take_aux_loss() is None  # taken once


def test_aux_and_z_loss_reach_the_gradient_and_leave_the_reported_loss_the_language_model_loss() -> None:
    x = torch.randint(0, 120, (2, 16))
    grads, losses = [], []
    for aux, z in ((0.0, 0.0), (0.01, 1e-3)):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(CFG, moe_aux_loss_coef=aux, moe_z_loss_coef=z))
        loss = model(x, x)
        loss.backward()
        losses.append(loss.item())
        grads.append(model.blocks["1"].mlp.router.gate.weight.grad)
        with torch.no_grad():
            assert loss.item() == model.eval()(x, x).item()  # the value: cross-entropy alone
    assert losses[0] == losses[1]
    assert not torch.allclose(grads[0], grads[1])  # the gradient: cross-entropy + weighted auxiliary losses


def test_bias_balancing_moves_a_skewed_router_toward_uniform_load() -> None:
    moe = _moe(moe_balance="bias", moe_bias_update_rate=0.05, moe_top_k=1).train()
    with torch.no_grad():
        moe.router.gate.weight.normal_(0.0, 0.1)
        moe.router.gate.weight[2, :] += 0.05  # skewed: expert 2 wins most tokens
    x = torch.randn(4, 16, 32).abs()

    def imbalance() -> float:
        moe(x)
        counts = take_statistics(moe)[""][:4]
        update_expert_bias(moe, {"": counts})
        return float(counts.max() / counts.mean())

    first = imbalance()
    later = [imbalance() for _ in range(30)][-10:]
    assert first > 2.0 and sum(later) / len(later) < 0.7 * first
    assert moe.router.expert_bias[2] < 0 < moe.router.expert_bias[[0, 1, 3]].max()
    assert "router.expert_bias" in moe.state_dict()  # saved with the weights


def test_parameter_and_flop_accounting_matches_the_model() -> None:
    for changes in ({}, {"moe_shared_expert": True, "moe_ffn_hidden": 64, "moe_every": 1}):
        cfg = dataclasses.replace(CFG, **changes)
        with torch.device("meta"):
            model = GPT(cfg)
        counts = parameter_count(cfg)
        assert counts["total"] == model.num_parameters()
        experts = [m.experts for m in model.modules() if isinstance(m, MoE)]
        unused = sum(p.numel() for e in experts for p in e.parameters()) * (cfg.moe_experts - cfg.moe_top_k)
        assert counts["active"] == counts["total"] - unused // cfg.moe_experts
    dense = ModelConfig(vocab_size=120, seq_len=16, n_layers=2, hidden=32, n_heads=4, padded_vocab_multiple=64)
    half = dataclasses.replace(CFG, moe_ffn_hidden=64)  # top-2 of experts half as wide: the dense FLOPs + router
    assert flops_per_token(half)["forward"] - flops_per_token(dense)["forward"] == 2 * 32 * 4


def test_bad_moe_settings_name_the_field() -> None:
    for changes, field in (({"moe_top_k": 5}, "moe_top_k"), ({"moe_balance": "x"}, "moe_balance"),
                           ({"moe_score": "relu"}, "moe_score"), ({"moe_every": 3}, "moe_every")):
        with pytest.raises(ConfigError, match=field):
            dataclasses.replace(CFG, **changes).validate()
