"""The block-family switches: validation, published parameter counts of the presets, the KV cache with
grouped-query attention, SwiGLU experts and int8 on the new blocks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mtnlg.config import Config, ConfigError, ModelConfig
from mtnlg.config.presets import get_preset
from mtnlg.generate.quantize import load_quantized, quantize_model, save_quantized
from mtnlg.model.counts import flops_per_token, parameter_count
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache
from mtnlg.planner import GPUS, make_layout, plan

# Published parameter counts: the totals of the released safetensors files (Qwen3-0.6B's stores its tied
# output layer a second time, 151936 x 1024 more than the model has) and Qwen 3's stated non-embedding sizes.
PUBLISHED_TOTAL = {"llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800,
                   "qwen3-0.6b": 751_632_384 - 151936 * 1024, "qwen3-8b": 8_190_735_360, "mistral-7b": 7_248_023_552}
PUBLISHED_NON_EMBEDDING = {"qwen3-0.6b": 0.44e9, "qwen3-8b": 6.95e9}


def tiny(**kw: object) -> ModelConfig:
    """llama-tiny cut down to test size (2 layers, hidden 64, 8 heads over 2 kv heads)."""
    shape: dict[str, object] = dict(vocab_size=256, seq_len=64, n_layers=2, hidden=64, n_heads=8, ffn_hidden=96)
    return dataclasses.replace(get_preset("llama-tiny"), **(shape | kw))


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL))
def test_preset_counts_are_the_published_ones(name):
    counts = parameter_count(get_preset(name))
    assert abs(counts["total"] - PUBLISHED_TOTAL[name]) / PUBLISHED_TOTAL[name] < 0.005
    if name in PUBLISHED_NON_EMBEDDING:
        assert abs(counts["non_embedding"] - PUBLISHED_NON_EMBEDDING[name]) / PUBLISHED_NON_EMBEDDING[name] < 0.005


def test_flops_and_plan_of_llama3():
    """Llama 3 405B: 3.8e25 training FLOPs for 15.6T tokens at 8K context (Grattafiori et al. 2024), i.e.
    2.44e12 per token; the count here adds attention's 12 L T H D, which that 6N figure leaves out."""
    cfg = get_preset("llama3.1-405b")
    train = flops_per_token(cfg, seq_len=8192)["train"]
    assert 1.0 < train / (3.8e25 / 15.6e12) < 1.1
    cfg70 = get_preset("llama3-70b")
    p = plan(cfg70, make_layout(gpus=64, tp=8, pp=4, global_batch=512), GPUS["h100-80gb"])
    assert p.parameters == PUBLISHED_TOTAL["llama3-70b"] and p.model_flops_per_token == flops_per_token(cfg70)["train"]
    with pytest.raises(ConfigError, match="does not divide model.n_kv_heads=8"):
        plan(cfg70, make_layout(gpus=128, tp=16, pp=1, global_batch=512), GPUS["h100-80gb"])


@pytest.mark.parametrize("bad, field", [
    (dict(position="alibi"), "model.position"), (dict(norm="batchnorm"), "model.norm"),
    (dict(mlp="geglu"), "model.mlp"),
    (dict(n_kv_heads=3), "model.n_kv_heads=3"), (dict(rope_scaling="llama3"), "model.rope_original_len"),
    (dict(position="learned", rope_scaling="linear", rope_factor=2.0), "model.rope_scaling"),
    (dict(rope_scaling="linear", rope_factor=0.5), "model.rope_factor"),
])
def test_bad_switches_name_their_field(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny(**bad).validate()


def test_kv_cache_holds_kv_heads_and_decodes_as_the_full_forward():
    torch.manual_seed(0)
    model = GPT(tiny(qk_norm=True)).eval()
    ids = torch.randint(0, 256, (2, 20))
    cache = KVCache(2, 64)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :12], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]
    assert cache.keys[0].shape == (2, 2, 64, 8)  # (B, n_kv_heads, capacity, head_dim): a quarter of the heads
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_swiglu_experts_that_copy_the_dense_mlp_give_its_output():
    torch.manual_seed(0)
    dense = GPT(tiny()).eval()
    moe = GPT(tiny(moe_experts=4, moe_top_k=2)).eval()
    state = moe.state_dict()
    with torch.no_grad():
        for name, t in dense.state_dict().items():
            if name in state:
                state[name].copy_(t)
        for i in range(2):
            for part in ("fc_in", "fc_gate", "fc_out"):
                getattr(moe.blocks[str(i)].mlp.experts, f"{part}_weight").copy_(
                    getattr(dense.blocks[str(i)].mlp, part).weight.expand(4, -1, -1))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert (moe(ids) - dense(ids)).abs().max() < 1e-5
    assert moe.blocks["0"].mlp.experts.fc_in_bias is None  # model.bias off reaches the experts too


@pytest.mark.parametrize("experts", [0, 4])
def test_int8_runs_saves_and_loads_the_new_blocks(experts, tmp_path):
    torch.manual_seed(0)
    cfg = tiny(moe_experts=experts)
    model = GPT(cfg).eval()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        reference = model(ids)
        quantized = quantize_model(model)(ids)
        save_quantized(tmp_path / "int8", model, Config(model=cfg))
        again = load_quantized(tmp_path / "int8")[0](ids)
    assert torch.nn.functional.cosine_similarity(reference.flatten(), quantized.flatten(), dim=0) > 0.999
    assert torch.equal(again, quantized)
