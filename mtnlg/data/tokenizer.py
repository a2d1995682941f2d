"""Byte-level BPE (GPT-2 style) over Hugging Face ``tokenizers``.

Byte-level means every Unicode string maps to bytes first, so encoding then decoding gives
back exactly the input, whatever it contains. ``<|endoftext|>`` marks the end of a document.

Text is always plain text: ``<|endoftext|>`` (or a chat marker) written inside a prompt, a
document or a fine-tuning record is encoded as its characters, never as the special token, so a
user cannot end a document or open a turn by typing it. Only code that places a special token
itself names it (``encode(text, specials=...)``: the chat template's markers).

A long text is encoded in pieces of about ``PIECE_CHARS`` characters, cut before a lone space or
newline between two words: the byte-level pre-tokenizer splits there anyway (a space starts the
next word's token, a newline is one of its own), so the ids are those of the whole text, while
the tokenizer's working memory (about 150 bytes per input byte in one call) stays that of one
piece. Only a piece without such a space (base64, a run of punctuation) is cut where it ends,
which may change a token or two there.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from mtnlg.data.jsonl import BadLine, numbered_lines, parse_json_object
from mtnlg.util.fs import read_json

EOD_TOKEN = "<|endoftext|>"
# What imported tokenizers end documents with when they lack EOD_TOKEN (Llama 3, Llama 2 / Mistral, ChatML).
EOD_FALLBACKS = ("<|end_of_text|>", "</s>", "<|im_end|>")
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.json"  # see mtnlg/generate/chat.py
PIECE_CHARS = 1 << 16  # characters a long text is encoded in at a time


def _byte_level(model: models.BPE) -> HFTokenizer:
    """Wrap a BPE model with GPT-2's byte-level pre-tokenizer (its regex) and decoder."""
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


class Tokenizer:
    """Encode text to token ids and back; ``eod_id`` ends each document."""

    def __init__(self, hf: HFTokenizer, chat_template: dict | None = None) -> None:
        eod = next((i for t in (EOD_TOKEN, *EOD_FALLBACKS) if (i := hf.token_to_id(t)) is not None), None)
        if eod is None:
            raise ValueError(f"tokenizer has no {EOD_TOKEN!r} (nor {', '.join(EOD_FALLBACKS)}) token, which mtnlg "
                             "uses to end documents")
        hf.encode_special_tokens = True  # special tokens in text are text (not saved: tokenizer.json is unchanged)
        self.hf = hf
        self._longest: tuple[int, int] = (0, 0)  # (vocabulary size, max_token_bytes) when last counted
        self.eod_id: int = eod
        self.chat_template = chat_template  # role markers for chat, stored beside tokenizer.json

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
    ) -> Tokenizer:
        """Learn merges from an iterator of documents (streamed, not held in memory)."""
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOD_TOKEN}), got {vocab_size}")
        hf = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOD_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_gpt2_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
        """Load a GPT-2 style ``vocab.json`` + ``merges.txt`` pair from local paths."""
        for p in (vocab_json, merges_txt):
            if not Path(p).is_file():
                raise FileNotFoundError(f"tokenizer file not found: {p}")
        hf = _byte_level(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        if hf.token_to_id(EOD_TOKEN) is None:
            hf.add_special_tokens([EOD_TOKEN])
        else:
            hf.add_special_tokens([EOD_TOKEN])  # mark the existing entry special so it is never split
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``) or a file."""
        path = Path(path)
        chat_template = _read_chat_template(path if path.is_dir() else path.parent)
        if path.is_dir():
            if (path / TOKENIZER_FILE).is_file():
                path = path / TOKENIZER_FILE
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                tokenizer = cls.from_gpt2_files(path / "vocab.json", path / "merges.txt")
                tokenizer.chat_template = chat_template
                return tokenizer
            else:
                raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE}, nor vocab.json + merges.txt")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizer.json: {exc}") from None
        return cls(hf, chat_template)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / TOKENIZER_FILE))
        if self.chat_template is not None:
            text = json.dumps(self.chat_template, indent=2) + "\n"
            (directory / CHAT_TEMPLATE_FILE).write_text(text, encoding="utf-8")
        return directory

    def save_gpt2_files(self, directory: str | Path) -> None:
        """Write ``vocab.json`` + ``merges.txt`` (what HF's GPT2Tokenizer reads)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.hf.to_str())["model"]
        (directory / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    # -- use -----------------------------------------------------------------------------------

    def encode(self, text: str, specials: Collection[str] = ()) -> list[int]:
        """Ids of ``text`` as plain text; only the strings in ``specials`` that are special tokens of
        this tokenizer become their one id (a marker that is not one stays text, as before)."""
        marks = [m for m in specials if m in self._special_ids()]
        if not marks:
            return self._encode_plain(text)
        ids: list[int] = []
        for part in re.split("(" + "|".join(re.escape(m) for m in marks) + ")", text):
            ids += [self._special_ids()[part]] if part in marks else self._encode_plain(part) if part else []
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if len(text) <= PIECE_CHARS:
            return self.hf.encode(text).ids
        ids: list[int] = []
        for piece in pieces(text):
            ids += self.hf.encode(piece).ids
        return ids

    def max_token_bytes(self) -> int:
        """An upper bound of the UTF-8 bytes (so of the characters) one token stands for: the first
        N tokens of a text come from at most N times this many of its characters."""
        if self._longest[0] != self.vocab_size:
            longest = max(len(t.encode("utf-8")) for t in self.hf.get_vocab(with_added_tokens=True))
            self._longest = (self.vocab_size, longest)
        return self._longest[1]

    def _special_ids(self) -> dict[str, int]:
        return {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents at once (uses the Rust library's threads), as plain text."""
        return [e.ids for e in self.hf.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_str(self, token_id: int) -> str:
        """The decoded text of one token (may be part of a multi-byte character)."""
        return self.decode([token_id])


_WORD_SPACE = re.compile(r"(?<=\S)\s(?=\S)")  # one whitespace character between two others


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``size`` characters, each (but the last) ending just
    before the last lone whitespace character between two others in its second half, else at ``size``."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = None
        for match in _WORD_SPACE.finditer(text, start + size // 2, end):
            cut = match.start()
        end = cut if cut is not None else end
        yield text[start:end]
        start = end
    yield text[start:]


def _read_chat_template(directory: Path) -> dict | None:
    path = directory / CHAT_TEMPLATE_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'roles' and 'end'")
    return data


def iter_text_files(paths: Iterable[str | Path]) -> Iterator[str]:
    """Documents from ``.jsonl`` files (``text`` key) and plain text files (whole file)."""
    for p in paths:
        p = Path(p)
        if p.suffix == ".jsonl":
            for _, raw in numbered_lines(p):
                try:
                    text = parse_json_object(raw).get("text")
                except BadLine:
                    continue  # preprocess reports bad lines; training a tokenizer just skips them
                if isinstance(text, str) and text:
                    yield text
        else:
            yield p.read_text(encoding="utf-8", errors="replace")


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Copy a tokenizer directory's files (used to make checkpoints self-contained)."""
    Tokenizer.load(src)  # fail early on a bad source
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    files = [src] if src.is_file() else [f for f in src.iterdir() if f.is_file()]
    for f in files:
        shutil.copy2(f, dst / f.name)
