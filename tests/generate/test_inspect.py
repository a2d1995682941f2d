"""The token inspector: the logit lens ends in the model's own logits, the explicit attention is SDPA's,
and the model it inspects is left as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mtnlg.config import ModelConfig
from mtnlg.generate.inspect import explicit_attention, inspect_prompt
from mtnlg.generate.quantize import prepare_for_inference
from mtnlg.model.gpt import GPT

CFG = ModelConfig(vocab_size=100, seq_len=32, n_layers=3, hidden=64, n_heads=4, padded_vocab_multiple=64, init_std=0.3)


@pytest.mark.parametrize("family", [{}, {"n_kv_heads": 2, "position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}])
def test_lens_ends_in_the_model_logits_and_attention_is_causal(family: dict) -> None:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, **family)).eval()
    tokens = list(range(5, 17))
    found = inspect_prompt(prepare_for_inference(model), tokens, top_k=3, attention_layer=1)
    assert found.lens_ids.shape == found.lens_logprobs.shape == (3, 12, 3)
    with torch.no_grad():
        logp = model(torch.tensor([tokens]))[0, :, :100].log_softmax(-1)
    top = logp.topk(3, dim=-1)
    assert torch.equal(found.lens_ids[-1], top.indices)  # the last layer's lens is the model's prediction
    torch.testing.assert_close(found.lens_logprobs[-1], top.values, rtol=1e-4, atol=1e-4)
    assert not torch.equal(found.lens_ids[0], found.lens_ids[-1])  # earlier layers guess otherwise
    assert found.attention.shape == (4, 12, 12)
    torch.testing.assert_close(found.attention.sum(-1), torch.ones(4, 12))
    assert found.attention.triu(1).abs().max() == 0  # causal: no query sees a later key
    assert all(b.attn.core is None for b in model.blocks.values())  # the fast path is untouched


@pytest.mark.parametrize("gqa", [1, 2])
def test_explicit_attention_equals_sdpa(gqa: int) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4 // gqa, 7, 8), torch.randn(2, 4 // gqa, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    sink: list = []
    extra = {"enable_gqa": True} if gqa > 1 else {}
    ours = explicit_attention(q, k, v, mask, sink=sink, **extra)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, mask, **extra), rtol=1e-5, atol=1e-5)
    assert sink[0].shape == (2, 4, 5, 7) and sink[0].masked_select(~mask).abs().max() == 0
    causal = explicit_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], is_causal=True, **extra)
    reference = F.scaled_dot_product_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], is_causal=True, **extra)
    torch.testing.assert_close(causal, reference, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_clear_errors() -> None:
    model = GPT(CFG).eval()
    with pytest.raises(ValueError, match=r"attention_layer must be in \[0, 3\)"):
        inspect_prompt(model, [1, 2], attention_layer=3)
    with pytest.raises(ValueError, match="top_k must be in"):
        inspect_prompt(model, [1, 2], top_k=0)
    with pytest.raises(ValueError, match="the inspector takes 1 to 32"):
        inspect_prompt(model, list(range(33)))
