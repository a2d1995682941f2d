"""The plain GPT: KV-cache decoding equals the full forward, masks, init and checkpointing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mtnlg.config import ConfigError, ModelConfig
from mtnlg.model import GPT, KVCache


@pytest.fixture
def model(small_model_config):
    torch.manual_seed(0)
    return GPT(small_model_config).eval()


def test_logits_shape_and_loss(model, small_model_config):
    idx = torch.randint(0, 300, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, small_model_config.padded_vocab_size)
    loss = model(idx[:, :-1], targets=idx[:, 1:])
    # At init the model is close to uniform over the padded vocabulary.
    assert abs(loss.item() - math.log(small_model_config.padded_vocab_size)) < 0.5


def test_kv_cache_token_by_token_equals_full_forward(model):
    idx = torch.randint(0, 300, (3, 20))
    full = model(idx)
    cache = KVCache(model.cfg.n_layers, max_len=32)
    steps = [model(idx[:, t : t + 1], kv_cache=cache) for t in range(20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20


def test_kv_cache_chunked_prefill_equals_full_forward(model):
    idx = torch.randint(0, 300, (2, 24))
    full = model(idx)
    cache = KVCache(model.cfg.n_layers, max_len=24)
    parts = [model(idx[:, a:b], kv_cache=cache) for a, b in ((0, 7), (7, 8), (8, 19), (19, 24))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds the context length|overflow"):
        model(idx[:, :1], kv_cache=cache)


def test_kv_cache_buffers_are_allocated_once(model):
    cache = KVCache(model.cfg.n_layers, max_len=16)
    model(torch.randint(0, 300, (1, 4)), kv_cache=cache)
    buffers = [k.data_ptr() for k in cache.keys]
    model(torch.randint(0, 300, (1, 1)), kv_cache=cache)
    assert [k.data_ptr() for k in cache.keys] == buffers


def test_kv_cache_append_rows_right_aligns_the_shorter_cache(model):
    """A running batch (6 cached positions) takes a newcomer prefilled to 4: the next step with the
    newcomer's first 2 slots masked gives each row its logits alone."""
    old, new = torch.randint(0, 300, (2, 6)), torch.randint(0, 300, (1, 4))
    cache, joining = KVCache(model.cfg.n_layers, max_len=8), KVCache(model.cfg.n_layers, max_len=5)
    model(old, kv_cache=cache)
    model(new, kv_cache=joining)
    cache.append_rows(joining, rows=1, max_len=10)
    assert cache.max_len == 10 and cache.keys[0].shape[0] == 3 and cache.length == 6
    nxt = torch.randint(0, 300, (3, 1))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, :2] = False
    positions = torch.tensor([[6], [6], [4]])
    step = model(nxt, kv_cache=cache, attention_mask=mask, position_ids=positions)
    for i, row in enumerate([old[0], old[1], new[0]]):
        alone = model(torch.cat([row, nxt[i]]).unsqueeze(0))
        torch.testing.assert_close(step[i, 0], alone[0, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot append"):
        joining.append_rows(cache, rows=3, max_len=10)


def test_left_padded_batch_equals_rows_alone(model):
    """Rows of different lengths, left-padded, give each row's own logits at its real tokens."""
    rows = [torch.randint(0, 300, (n,)) for n in (9, 4, 6)]
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r) :] = r
        mask[i, T - len(r) :] = True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    cache = KVCache(model.cfg.n_layers, max_len=T + 3)
    batched = model(idx, kv_cache=cache, attention_mask=mask, position_ids=positions)
    nxt = torch.randint(0, 300, (len(rows), 1))
    mask2 = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.bool)], dim=1)
    step = model(nxt, kv_cache=cache, attention_mask=mask2, position_ids=positions[:, -1:] + 1)
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[i]]).unsqueeze(0))
        torch.testing.assert_close(batched[i, T - len(r) :], alone[0, :-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[i, 0], alone[0, -1], atol=1e-5, rtol=1e-5)
    assert not torch.isnan(batched).any()


@pytest.mark.parametrize("mode", ["selective", "full", "alias"])
def test_recompute_gives_the_loss_and_grads_of_none(small_model_config, mode):
    """Recomputation replays the dropout masks (torch.utils.checkpoint restores the RNG), so with dropout
    the loss and every gradient equal the run that keeps everything; ``alias`` is the older
    ``model.activation_checkpointing=true``."""
    idx = torch.randint(0, 300, (2, 16))
    results = []
    for recompute in ("none", mode):
        torch.manual_seed(0)
        alias = recompute == "alias"
        cfg = dataclasses.replace(small_model_config, dropout=0.1, recompute="none" if alias else recompute,
                                  activation_checkpointing=alias)
        m = GPT(cfg).train()
        loss = m(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_recompute_contradicting_its_alias_is_refused(small_model_config):
    with pytest.raises(ConfigError, match="model.activation_checkpointing=true means model.recompute=full"):
        dataclasses.replace(small_model_config, recompute="selective", activation_checkpointing=True).validate()
    with pytest.raises(ConfigError, match="model.recompute must be one of none, selective, full"):
        dataclasses.replace(small_model_config, recompute="some").validate()


def test_megatron_init_scales_output_projections():
    cfg = ModelConfig(vocab_size=512, seq_len=16, n_layers=8, hidden=256, n_heads=4, init_std=0.02)
    torch.manual_seed(0)
    m = GPT(cfg)
    assert abs(m.blocks["0"].mlp.fc_in.weight.std().item() - 0.02) < 0.002
    assert abs(m.blocks["0"].attn.out_proj.weight.std().item() - 0.02 / 4) < 0.0005
    assert abs(m.blocks["0"].mlp.fc_out.weight.std().item() - 0.02 / 4) < 0.0005
    assert m.lm_head.weight is m.wte.weight
    assert torch.all(m.blocks["0"].attn.qkv_proj.bias == 0)


def test_causality(model):
    """Changing a later token never changes earlier logits."""
    idx = torch.randint(0, 300, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 300
    torch.testing.assert_close(model(idx)[0, :8], model(changed)[0, :8])
    assert not torch.allclose(model(idx)[0, 8:], model(changed)[0, 8:])


def test_sequence_longer_than_context_is_an_error(model):
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
