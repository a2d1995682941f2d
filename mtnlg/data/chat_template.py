"""The chat template: a list of messages rendered to token ids (and back) with role markers.

A conversation is written as

    <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

and a prompt for the model's next turn ends with ``<|assistant|>\\n``: the model answers and
ends its turn with ``<|end|>``, which is therefore the stop string of every chat completion.
The markers are special tokens of the byte-level BPE (``attach`` adds them), so they are one id
each and never split or produced by ordinary text. The template is saved with the tokenizer
(``chat_template.json`` beside ``tokenizer.json``) and so travels in every checkpoint; a tokenizer without one gets
``ChatTemplate()``, the default above. A tokenizer that lacks the marker tokens still renders
(the markers are then encoded as ordinary text), so any checkpoint can be chatted with.

Fine-tuning trains on what the assistant says: ``encode`` returns, with the ids, a mask that is
true on each assistant message's content and its closing ``<|end|>`` (so the model learns to
stop), and false on the markers and on everything the other roles say.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from mtnlg.data.tokenizer import CHAT_TEMPLATE_FILE, Tokenizer

Message = Mapping[str, str]


def _default_roles() -> dict[str, str]:
    return {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


@dataclass(frozen=True)
class ChatTemplate:
    """Role markers and the end-of-turn marker; each marker is one special token."""

    roles: dict[str, str] = field(default_factory=_default_roles)
    end: str = "<|end|>"
    add_tokens: bool = True  # False: the markers are made of the tokenizer's own special tokens (imported ChatML)
    specials: list[str] = field(default_factory=list)  # the special tokens the markers are made of; empty: themselves

    # -- storage ---------------------------------------------------------------------------------

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """The template saved with ``tokenizer`` (``chat_template.json``), or the default when it has none."""
        data = tokenizer.chat_template
        if data is None:
            return cls()
        try:
            template = cls(roles=dict(data["roles"]), end=data["end"], add_tokens=bool(data.get("add_tokens", True)),
                           specials=list(data.get("specials", [])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{CHAT_TEMPLATE_FILE}: expected {{'roles': {{...}}, 'end': ...}}: {exc}") from None
        if "assistant" not in template.roles or not all(isinstance(m, str) and m for m in template.markers):
            raise ValueError(f"{CHAT_TEMPLATE_FILE}: roles must include 'assistant' and every marker be a string")
        return template

    def attach(self, tokenizer: Tokenizer) -> int:
        """Store this template with ``tokenizer`` and make every marker a special token of it.

        Returns how many ids were added. New ids come after the existing ones, so a model trained
        with the tokenizer keeps its embedding rows and only needs rows for the new ids.
        """
        tokenizer.chat_template = asdict(self)
        return tokenizer.hf.add_special_tokens(self.markers) if self.add_tokens else 0

    @classmethod
    def from_hf(cls, jinja: str) -> ChatTemplate | None:
        """The template a Hugging Face ``chat_template`` (Jinja) amounts to, when it is ChatML (Qwen 2/2.5/3:
        ``<|im_start|>{role}\n{content}<|im_end|>\n``): each role marker ``<|im_start|>{role}``, the end
        ``<|im_end|>``, rendered with the tokenizer's own special tokens. None for other templates. What such
        a template adds beyond ChatML (a default system prompt, tool calls, thinking blocks) is not kept."""
        if "<|im_start|>" not in jinja or "<|im_end|>" not in jinja:
            return None
        roles = {role: f"<|im_start|>{role}" for role in ("system", "user", "assistant")}
        return cls(roles=roles, end="<|im_end|>", add_tokens=False, specials=["<|im_start|>", "<|im_end|>"])

    @property
    def markers(self) -> list[str]:
        return [*self.roles.values(), self.end]

    @property
    def special_tokens(self) -> list[str]:
        """What a rendered conversation encodes as special tokens (``Tokenizer.encode(specials=...)``):
        the markers, or the tokens they are made of (ChatML's ``<|im_start|>`` of ``<|im_start|>user``)."""
        return self.specials or self.markers

    def has_tokens(self, tokenizer: Tokenizer) -> bool:
        return all(tokenizer.hf.token_to_id(m) is not None for m in self.markers)

    # -- rendering -------------------------------------------------------------------------------

    def _check(self, messages: Sequence[Message]) -> None:
        if isinstance(messages, (str, bytes)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: expected an object with a string 'content'")
            if m.get("role") not in self.roles:
                raise ValueError(f"messages[{i}].role: {m.get('role')!r} is not one of {sorted(self.roles)}")
            if any(marker in m["content"] for marker in {*self.markers, *self.special_tokens}):
                raise ValueError(f"messages[{i}].content contains a chat marker "
                                 f"({', '.join(dict.fromkeys([*self.markers, *self.special_tokens]))})")

    def _pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The rendered text as (piece, trained) pairs; concatenated, the pieces are ``render``'s text."""
        self._check(messages)
        pieces: list[tuple[str, bool]] = []
        for m in messages:
            trained = m["role"] == "assistant"
            pieces += [(self.roles[m["role"]] + "\n", False), (m["content"] + self.end, trained), ("\n", False)]
        if add_generation_prompt:
            pieces.append((self.roles["assistant"] + "\n", False))
        return pieces

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as text; with ``add_generation_prompt`` it ends where the assistant speaks."""
        return "".join(piece for piece, _ in self._pieces(messages, add_generation_prompt))

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of ``render(messages)`` and, per id, whether it is trained (assistant output).

        Each piece is encoded on its own; since every piece ends at a marker or a newline
        that the next marker follows, this gives the same ids as encoding the whole text.
        """
        ids: list[int] = []
        trained: list[bool] = []
        for piece, is_trained in self._pieces(messages, add_generation_prompt):
            piece_ids = tokenizer.encode(piece, specials=self.special_tokens)
            ids += piece_ids
            trained += [is_trained] * len(piece_ids)
        return ids, trained

    def parse(self, text: str) -> list[dict[str, str]]:
        """The messages of a rendered conversation (``render``'s inverse)."""
        marker_role = {marker: role for role, marker in self.roles.items()}
        pattern = "(" + "|".join(re.escape(m) for m in self.roles.values()) + r")\n(.*?)" + re.escape(self.end) + r"\n?"
        messages = [{"role": marker_role[m.group(1)], "content": m.group(2)} for m in re.finditer(pattern, text, re.S)]
        if not messages or self.render(messages, add_generation_prompt=False) != text:
            raise ValueError("text is not a conversation rendered by this chat template")
        return messages
