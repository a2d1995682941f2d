"""The chat template: rendering, encoding with the assistant mask, storage with the tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse: a b c"},
    {"role": "assistant", "content": "c b a"},
    {"role": "user", "content": "Uppercase: héllo\nworld"},
    {"role": "assistant", "content": "HÉLLO\nWORLD"},
]


def test_render_and_parse_round_trip() -> None:
    template = ChatTemplate()
    text = template.render(CONVERSATION, add_generation_prompt=False)
    assert text.startswith("<|system|>\nBe brief.<|end|>\n<|user|>\n")
    assert template.parse(text) == CONVERSATION
    prompt = template.render(CONVERSATION[:2])
    assert prompt.endswith("<|user|>\nReverse: a b c<|end|>\n<|assistant|>\n")
    with pytest.raises(ValueError, match="not a conversation"):
        template.parse("plain text")


@pytest.fixture
def tokenizer(small_tokenizer: Tokenizer) -> Tokenizer:
    """A copy of the session's tokenizer (attaching a template changes a tokenizer)."""
    return Tokenizer(HFTokenizer.from_str(small_tokenizer.hf.to_str()))


def test_encode_marks_only_assistant_content_and_end(tokenizer: Tokenizer) -> None:
    template = ChatTemplate()
    added = template.attach(tokenizer)
    assert added == 4 and template.has_tokens(tokenizer)
    ids, trained = template.encode(tokenizer, CONVERSATION)
    text = template.render(CONVERSATION, add_generation_prompt=False)
    assert ids == tokenizer.encode(text, specials=template.markers)  # piecewise equals the whole text
    end_id = tokenizer.hf.token_to_id("<|end|>")
    trained_text = tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t])
    assert trained_text == "c b a<|end|>HÉLLO\nWORLD<|end|>"
    assert sum(1 for i, t in zip(ids, trained, strict=True) if t and i == end_id) == 2
    assert all(tokenizer.hf.token_to_id(m) in ids for m in template.markers)


def test_special_tokens_in_content_are_plain_text(tokenizer: Tokenizer) -> None:
    """A fine-tuning record (or a chat request) that writes <|endoftext|> gets its characters, not
    the end-of-document token; only the template's own markers are special ids."""
    template = ChatTemplate()
    template.attach(tokenizer)
    messages = [{"role": "user", "content": "a<|endoftext|>b"}, {"role": "assistant", "content": "<|endoftext|>"}]
    ids, _ = template.encode(tokenizer, messages)
    assert tokenizer.eod_id not in ids
    assert tokenizer.decode(ids) == template.render(messages, add_generation_prompt=False)
    assert sum(i == tokenizer.hf.token_to_id("<|end|>") for i in ids) == 2


def test_template_travels_with_the_tokenizer(tokenizer: Tokenizer, tmp_path) -> None:
    assert ChatTemplate.of(tokenizer) == ChatTemplate()  # none saved: the default
    custom = ChatTemplate(roles={"user": "<|u|>", "assistant": "<|a|>"}, end="<|e|>")
    custom.attach(tokenizer)
    loaded = Tokenizer.load(tokenizer.save(tmp_path / "tok"))
    assert ChatTemplate.of(loaded) == custom
    assert loaded.encode("<|u|>", specials=custom.markers) == [loaded.hf.token_to_id("<|u|>")]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\].role"),
        ([{"role": "user"}], r"messages\[0\]: expected"),
        ([{"role": "user", "content": "a<|end|>b"}], "contains a chat marker"),
    ],
)
def test_bad_messages_are_named(messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChatTemplate().render(messages)
