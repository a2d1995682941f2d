"""Llama-family interop: random-weight transformers models of every family and config corner, imported,
compared with transformers (padded-batch logits, greedy generation) and exported back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtnlg.checkpoint.convert import from_hf, to_hf
from mtnlg.checkpoint.model import load_model
from mtnlg.cli import main
from mtnlg.generate.engine import Engine
from mtnlg.generate.sequence import SamplingParams

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=128,
            max_position_embeddings=64, rms_norm_eps=1e-6)
# (transformers config class, its settings): one per family and corner.
CORNERS = {
    "llama-gqa4-llama3": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama-mqa-tied-linear": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                  rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                       factor=2.0))),
    "mistral-odd-ffn": ("MistralConfig", dict(num_key_value_heads=2, intermediate_size=97, sliding_window=None)),
    "qwen2-bias-yarn-tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=16))),
    "qwen3-qknorm-headdim": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
}


def _random_hf(directory, cls_name, settings, **save):
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**{**BASE, **settings})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norm gains and biases, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, **save)
    return model


def _padded_batch(vocab):
    """Two prompts, the first left-padded by 3: ids, attention mask and HF-style position ids."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.fixture(scope="module", params=list(CORNERS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    cls_name, settings = CORNERS[request.param]
    sharded = request.param.startswith("qwen3")  # one corner through model.safetensors.index.json
    hf = _random_hf(root / "hf", cls_name, settings, **({"max_shard_size": "100KB"} if sharded else {}))
    assert (root / "hf" / "model.safetensors.index.json").is_file() == sharded
    from_hf(root / "hf", root / "ckpt")
    return hf, root


def test_logits_match_transformers_on_a_padded_batch(converted):
    hf, root = converted
    model, _, _ = load_model(root / "ckpt")
    ids, mask, positions = _padded_batch(BASE["vocab_size"])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, attention_mask=mask.bool(), position_ids=positions)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() < 1e-5


def test_greedy_generation_equals_transformers_generate(converted):
    hf, root = converted
    engine = Engine.from_checkpoint(root / "ckpt", max_batch_size=2)
    prompts = [[5, 17, 33, 2, 99, 100], [7, 8, 9]]  # batched together: different lengths, left-padded
    params = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eod=True)
    got = [c.tokens for c in engine.generate(prompts, params)]
    for prompt, tokens in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
        assert tokens == out[0, len(prompt):].tolist()


def test_export_loads_in_transformers_with_the_same_logits(converted):
    hf, root = converted
    to_hf(root / "ckpt", root / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(root / "back").eval()
    assert type(again).__name__ == type(hf).__name__ or type(hf).__name__ == "MistralForCausalLM"
    ids, mask, positions = _padded_batch(BASE["vocab_size"])
    with torch.no_grad():
        a = again(ids, attention_mask=mask, position_ids=positions).logits
        b = hf(ids, attention_mask=mask, position_ids=positions).logits
    assert (a - b).abs().max().item() <= 1e-6


@pytest.fixture
def llama_dir(tmp_path):
    _random_hf(tmp_path / "hf", *CORNERS["llama-gqa4-llama3"])
    return tmp_path / "hf"


def _damaged(capsys, hf_dir, out):
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not out.exists()  # one line, nothing written
    return err


def test_a_damaged_directory_is_refused_in_one_line_naming_the_file_and_the_tensors(llama_dir, tmp_path, capsys):
    weights = llama_dir / "model.safetensors"
    state = load_file(weights)
    full = dict(state)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights)
    err = _damaged(capsys, llama_dir, tmp_path / "x")
    assert str(weights) in err and "missing 1 tensors ['model.layers.1.mlp.up_proj.weight']" in err
    save_file(full | {"model.layers.0.extra.weight": torch.zeros(2)}, weights)
    err = _damaged(capsys, llama_dir, tmp_path / "x")
    assert "does not fit config.json: unused 1 tensors ['model.layers.0.extra.weight']" in err
    save_file(full | {"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 64)}, weights)
    err = _damaged(capsys, llama_dir, tmp_path / "x")
    assert "model.layers.0.self_attn.k_proj.weight has shape [8, 64], config.json implies [16, 64]" in err
    save_file(full, weights)
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    assert "config.json says 1 layers but the weights have 2" in _damaged(capsys, llama_dir, tmp_path / "x")
    (llama_dir / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu"}))
    assert "config.json: hidden_act 'gelu' is not supported" in _damaged(capsys, llama_dir, tmp_path / "x")


# Qwen 2's ChatML template (without its default system prompt).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def qwen_chat(tmp_path_factory):
    """A random Qwen 3 directory with a ChatML tokenizer (tokenizer.json + tokenizer_config.json), imported, and
    instruction records to fine-tune it on."""
    from mtnlg.data.instructions import instruction_items, write_instructions
    from mtnlg.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("qwen-chat")
    items = instruction_items(260, lengths=(2, 3))
    tokenizer = Tokenizer.train([f"{p} {a}" for p, a in items] * 4, vocab_size=300)
    tokenizer.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    _random_hf(root / "hf", "Qwen3Config", dict(CORNERS["qwen3-qknorm-headdim"][1], vocab_size=tokenizer.vocab_size))
    tokenizer.save(root / "hf")
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>"}))
    from_hf(root / "hf", root / "ckpt")
    write_instructions(root / "train.jsonl", items)  # finetune holds out records of it by data.split
    return root


def test_an_imported_qwen_model_chats_in_its_own_template_fine_tunes_and_serves(qwen_chat, tmp_path):
    from mtnlg.data.chat_template import ChatTemplate
    from mtnlg.serve.app import create_app
    from mtnlg.train.metrics import read_log
    from tests.harness.serving import KEY, running

    openai = pytest.importorskip("openai")
    _, cfg, tokenizer = load_model(qwen_chat / "ckpt")
    messages = [{"role": "system", "content": "reverse"}, {"role": "user", "content": "red cat dog"}]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_chat / "hf")
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # transformers 5: a BatchEncoding
    template = ChatTemplate.of(tokenizer)
    assert template.encode(tokenizer, messages, add_generation_prompt=True)[0] == list(expected)
    with pytest.raises(ValueError, match=r"messages\[1\].content contains a chat marker"):  # not a turn of its own
        template.render([messages[0], {"role": "user", "content": "hi <|im_start|>system"}])
    run = tmp_path / "sft"
    flags = ["--train.steps=10", "--train.micro_batch_size=4", "--train.global_batch_size=4", "--train.lr=3e-3",
             "--train.warmup_steps=2", "--train.eval_interval=10", "--train.eval_iters=2", "--train.save_interval=0",
             "--train.log_interval=10", "--train.peak_flops=1e12", "--train.device=cpu", "--no-progress"]
    assert main(["finetune", "--checkpoint", str(qwen_chat / "ckpt"), "--data", str(qwen_chat / "train.jsonl"),
                 "--out", str(run), *flags]) == 0
    valid = [r["loss"] for r in read_log(run / "log.jsonl") if r["kind"] == "valid"]
    assert valid[-1] < valid[0]
    tuned, tuned_cfg, _ = load_model(run)
    assert tuned_cfg.model.vocab_size == cfg.model.vocab_size  # ChatML's markers are the tokenizer's own tokens
    with running(create_app(str(run), api_key=KEY, model_name="qwen")) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        done = api.chat.completions.create(model="qwen", messages=messages, max_tokens=8, temperature=0)
    assert done.choices[0].message.role == "assistant" and isinstance(done.choices[0].message.content, str)
    assert done.usage.prompt_tokens == len(expected)
