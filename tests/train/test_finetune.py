"""Supervised fine-tuning: the loss on answers only, packing without cross-record attention, bad
records, the vocabulary grown for the chat markers, learning held-out items, resume."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mtnlg.checkpoint.model import load_model, save_model
from mtnlg.cli import main
from mtnlg.config import Config, ModelConfig
from mtnlg.data.batch import split_batch
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.indexed import DataError
from mtnlg.data.instructions import instruction_items, write_instructions
from mtnlg.data.sft import encode_record, layout_samples, read_records
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.generate.engine import Engine, SamplingParams
from mtnlg.model.gpt import GPT
from mtnlg.model.loss import IGNORE_INDEX, cross_entropy_loss
from mtnlg.train.finetune import load_base_model
from mtnlg.train.metrics import read_log

WORDS = ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree")
SEQ = 64
N_TRAIN, N_HELD_OUT = 600, 60
# A run short enough for the suite; it answers 60 of the 60 held-out items right (README).
LEARN_FLAGS = ["--train.steps=200", "--train.micro_batch_size=16", "--train.global_batch_size=16",
               "--train.lr=4e-3", "--train.warmup_steps=20", "--train.eval_interval=200", "--train.eval_iters=2",
               "--train.log_interval=50", "--train.save_interval=0", "--train.peak_flops=1e12",
               "--train.device=cpu", "--no-progress"]


def _tokenizer_text() -> list[str]:
    """Lines of the words in both cases, so that every word (with or without a leading space) is one token."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(400)]
    return ["reverse: uppercase:\n" + "\n".join(lines[i:i + 8] + [w.upper() for w in lines[i:i + 8]])
            for i in range(0, 400, 8)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are 32-64 wide: their matmuls gain nothing from a second thread, and on a busy
    machine two spin-waiting threads make the training runs here several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base/``: an untrained tiny checkpoint with a 320-token BPE (no chat markers yet); ``train.jsonl``:
    the instruction records; ``held_out.json``: further (prompt, answer) items never trained on."""
    root = tmp_path_factory.mktemp("sft")
    tokenizer = Tokenizer.train(_tokenizer_text(), vocab_size=320)
    cfg = Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=SEQ, n_layers=2, hidden=64, n_heads=4,
                                   padded_vocab_multiple=64))
    torch.manual_seed(0)
    save_model(root / "base", GPT(cfg.model), cfg, tokenizer)
    items = instruction_items(N_TRAIN + N_HELD_OUT, WORDS, lengths=(2, 3))
    write_instructions(root / "train.jsonl", items[:N_TRAIN])
    (root / "held_out.json").write_text(json.dumps(items[N_TRAIN:]), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def chat_tokenizer(sft_root: Path) -> Tokenizer:
    tokenizer = Tokenizer.load(sft_root / "base" / "tokenizer")
    ChatTemplate().attach(tokenizer)
    return tokenizer


def _record(tokenizer: Tokenizer, prompt: str, answer: str):
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return encode_record(messages, ChatTemplate(), tokenizer, SEQ + 1)


def _model(tokenizer: Tokenizer) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=SEQ, n_layers=2, hidden=32, n_heads=4)
    return GPT(cfg).eval()


def _batch(tokenizer: Tokenizer, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Inputs, targets and document ids of a one-record packed batch."""
    samples = layout_samples([_record(tokenizer, prompt, answer)], SEQ + 1, pack=True, pad_id=tokenizer.eod_id)
    return split_batch(torch.from_numpy(samples))


def test_the_loss_counts_only_the_answer(chat_tokenizer: Tokenizer) -> None:
    inputs, targets, extra = _batch(chat_tokenizer, "reverse: cat dog sun", "sun dog cat")
    logits = _model(chat_tokenizer)(inputs, **extra).detach().requires_grad_()
    loss = cross_entropy_loss(logits, targets)
    loss.backward()
    trained = targets != IGNORE_INDEX
    assert chat_tokenizer.decode(targets[trained].tolist()) == "sun dog cat<|end|>"
    assert (logits.grad[~trained] == 0).all()  # prompt, markers and padding: no gradient through the loss
    assert (logits.grad[trained].abs().sum(-1) > 0).all()
    # Another prompt changes only targets the loss ignores; another answer changes the loss.
    other_inputs, other_targets, _ = _batch(chat_tokenizer, "reverse: cat dog moon", "sun dog cat")
    assert (other_inputs != inputs).any() and torch.equal(other_targets, targets)
    assert cross_entropy_loss(logits, other_targets) == loss
    other_answer = _batch(chat_tokenizer, "reverse: cat dog sun", "sun dog red")[1]
    assert cross_entropy_loss(logits, other_answer) != loss


def test_packed_records_compute_as_if_each_ran_alone(chat_tokenizer: Tokenizer) -> None:
    records = [_record(chat_tokenizer, p, a) for p, a in
               [("reverse: cat dog sun", "sun dog cat"), ("uppercase: red", "RED"), ("reverse: a b c d", "d c b a")]]
    packed = layout_samples(records, SEQ + 1, pack=True, pad_id=chat_tokenizer.eod_id)
    assert packed.shape == (1, 3, SEQ + 1)  # all three share one row
    model = _model(chat_tokenizer)
    inputs, targets, extra = split_batch(torch.from_numpy(packed))
    with torch.no_grad():
        logits = model(inputs, **extra)[0]
        start = 0
        for record in records:
            alone = model(torch.from_numpy(record.tokens)[None])[0]
            torch.testing.assert_close(logits[start:start + len(record.tokens)], alone, atol=1e-5, rtol=0)
            start += len(record.tokens)
        # Without the document ids the later records would see the earlier ones.
        assert not torch.allclose(model(inputs)[0, len(records[0].tokens):start], logits[len(records[0].tokens):start])
        # Padded, one record a row: the same loss as packed.
        padded = layout_samples(records, SEQ + 1, pack=False, pad_id=chat_tokenizer.eod_id)
        assert padded.shape == (3, 2, SEQ + 1)
        torch.testing.assert_close(model(*split_batch(torch.from_numpy(padded))[:2]), model(inputs, targets, **extra))


BAD_LINES = {
    "not json": "malformed JSON",
    json.dumps({"prompt": 1, "completion": "x"}): "'prompt' is not a string",
    json.dumps({"text": "hello"}): "neither prompt + completion nor messages",
    json.dumps({"messages": [{"role": "robot", "content": "x"}]}): "invalid messages",
    json.dumps({"messages": [{"role": "user", "content": "a question"}]}): "no assistant message",
    json.dumps({"prompt": "say <|end|>", "completion": "no"}): "invalid messages",
    json.dumps({"prompt": "reverse: " + "cat " * 80, "completion": "x"}): "longer than the context",
}


def test_bad_records_are_counted_and_named(chat_tokenizer: Tokenizer, sft_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    good = json.dumps({"prompt": "uppercase: red", "completion": "RED"})
    long_answer = json.dumps({"prompt": "reverse: cat", "completion": "cat " * 80})  # cut, but something is left
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good, *BAD_LINES, "", long_answer]) + "\n", encoding="utf-8")
    records, report = read_records([path], chat_tokenizer, SEQ + 1, max_bad=100)
    assert len(records) == 2 and report.truncated == 1 and report.blank_lines == 1
    assert report.skipped == Counter(BAD_LINES.values())
    summary = report.summary()
    assert f"{path}:2: malformed JSON" in summary and f"{path}:8: longer than the context" in summary
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        read_records([path], chat_tokenizer, SEQ + 1, max_bad=0)
    code = main(["finetune", "--checkpoint", str(sft_root / "base"), "--data", str(path),
                 "--out", str(tmp_path / "run"), "--finetune.max_bad_records=3"])
    assert code == 2
    assert "mtnlg finetune: error: more than finetune.max_bad_records=3 bad records" in capsys.readouterr().err


def test_the_vocabulary_grows_for_the_chat_markers(sft_root: Path) -> None:
    base, saved, tokenizer = load_model(sft_root / "base")
    assert saved.model.padded_vocab_size == 320 and not ChatTemplate().has_tokens(tokenizer)
    old = saved.model.vocab_size
    cfg = Config(model=saved.model)
    cfg.finetune.checkpoint = str(sft_root / "base")
    grown, chat_tokenizer = load_base_model(cfg)
    assert chat_tokenizer.vocab_size == cfg.model.vocab_size == old + 4 and ChatTemplate().has_tokens(chat_tokenizer)
    assert grown.wte.weight.shape == (384, 64) and grown.lm_head.weight is grown.wte.weight
    torch.testing.assert_close(grown.wte.weight[:old], base.wte.weight[:old], rtol=0, atol=0)
    mean = base.wte.weight[:old].mean(dim=0)
    torch.testing.assert_close(grown.wte.weight[old:], mean.expand(384 - old, 64), rtol=0, atol=0)
    others = {k: v for k, v in base.state_dict().items() if not k.endswith(("wte.weight", "lm_head.weight"))}
    for name, value in others.items():
        torch.testing.assert_close(grown.state_dict()[name], value, rtol=0, atol=0)


@pytest.fixture(scope="module")
def learned_run(sft_root: Path) -> Path:
    """The base model fine-tuned on ``train.jsonl``."""
    out = sft_root / "learned"
    assert main(["finetune", "--checkpoint", str(sft_root / "base"), "--data", str(sft_root / "train.jsonl"),
                 "--out", str(out), *LEARN_FLAGS]) == 0
    return out


def greedy_answers(checkpoint: Path, prompts: list[str]) -> list[str]:
    """The model's greedy answer to each prompt, asked as a one-turn chat."""
    engine = Engine.from_checkpoint(checkpoint)
    template = ChatTemplate.of(engine.tokenizer)
    chats = [engine.encode(template.render([{"role": "user", "content": p}]), specials=template.markers)
             for p in prompts]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop=[template.end])
    return [c.text.strip() for c in engine.generate(chats, params)]


def test_fine_tuning_teaches_held_out_items(sft_root: Path, learned_run: Path) -> None:
    held_out = json.loads((sft_root / "held_out.json").read_text(encoding="utf-8"))
    answers = greedy_answers(learned_run, [prompt for prompt, _ in held_out])
    right = sum(answer == expected for answer, (_, expected) in zip(answers, held_out, strict=True))
    assert right / len(held_out) >= 0.8, list(zip(answers, held_out, strict=True))[:10]
    valid = [r["loss"] for r in read_log(learned_run / "log.jsonl") if r["kind"] == "valid"]
    assert valid[-1] < 0.5 * valid[0]
    saved = Tokenizer.load(learned_run / "step_00000200" / "tokenizer")
    assert ChatTemplate.of(saved) == ChatTemplate() and ChatTemplate().has_tokens(saved)


def test_a_resumed_fine_tuning_run_equals_an_uninterrupted_one(sft_root: Path, learned_run: Path,
                                                              tmp_path: Path) -> None:
    # From a run directory whose tokenizer has the markers already; padded samples this time.
    flags = ["--checkpoint", str(learned_run), "--data", str(sft_root / "train.jsonl"), "--finetune.pack=false",
             "--train.steps=4", "--train.micro_batch_size=4", "--train.global_batch_size=8", "--train.eval_iters=1",
             "--train.eval_interval=2", "--train.peak_flops=1e12", "--train.device=cpu", "--no-progress"]
    assert main(["finetune", *flags, "--out", str(tmp_path / "whole")]) == 0
    assert main(["finetune", *flags, "--out", str(tmp_path / "split"), "--train.exit_interval=2"]) == 0
    assert (tmp_path / "split" / "latest").read_text() == "step_00000002"
    assert main(["finetune", "--resume", "--out", str(tmp_path / "split"), "--no-progress"]) == 0
    whole, split = (load_model(tmp_path / name)[0].state_dict() for name in ("whole", "split"))
    assert whole.keys() == split.keys()
    for name, value in whole.items():
        assert torch.equal(value, split[name]), name
    base = load_model(learned_run)[0]
    assert not torch.equal(base.wte.weight, load_model(tmp_path / "whole")[0].wte.weight)
    assert np.array_equal(*(np.array([r["loss"] for r in read_log(tmp_path / n / "log.jsonl") if r["kind"] == "valid"])
                            for n in ("whole", "split")))
