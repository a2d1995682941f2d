"""``POST /v1/inspect`` through the real server: the logit lens and one layer's attention, and its errors."""

from __future__ import annotations

import httpx
import torch

from mtnlg.generate.engine import Engine


def test_inspect_returns_the_lens_and_attention(client: httpx.Client, engine: Engine) -> None:
    r = client.post("/v1/inspect", json={"prompt": "The quick brown", "top_k": 3, "attention_layer": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = engine.encode("The quick brown")
    assert body["object"] == "inspection" and body["model"] == "tiny" and body["token_ids"] == ids
    assert body["tokens"] == [engine.tokenizer.token_str(i) for i in ids]
    assert [layer["layer"] for layer in body["layers"]] == [0, 1]
    assert all(len(layer["top"]) == len(ids) and all(len(alts) == 3 for alts in layer["top"])
               for layer in body["layers"])
    with torch.no_grad():
        greedy = engine.model(torch.tensor([ids]))[0, :, : engine.vocab_size].argmax(-1).tolist()
    assert [alts[0]["id"] for alts in body["layers"][-1]["top"]] == greedy
    weights = torch.tensor(body["attention"]["weights"])
    assert body["attention"]["layer"] == 1 and weights.shape == (4, len(ids), len(ids))
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, len(ids)), atol=1e-3, rtol=0)
    assert client.post("/v1/inspect", json={"prompt": ids}).json()["attention"] is None


def test_inspect_errors_name_the_field(client: httpx.Client, url: str) -> None:
    for body, param in (({"prompt": "x", "attention_layer": 2}, "attention_layer"),
                        ({"prompt": "x", "top_k": 0}, "top_k"), ({"prompt": "x " * 200}, "prompt"),
                        ({"prompt": "x", "model": "other"}, "model")):
        r = client.post("/v1/inspect", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (body, r.text)
    assert httpx.post(f"{url}/v1/inspect", json={"prompt": "x"}).status_code == 401
