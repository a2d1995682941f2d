"""Records in and out of datatrove: JSONL read with mtnlg's bad-line rules, written back unchanged.

A datatrove ``Document`` carries text, an id and metadata. mtnlg keeps the whole input record in
the metadata (its text field blanked, so the key order survives) and gives each document the id
``FILE:LINE`` (the input file's position among the inputs, the line number), which is also the
stable order in which duplicate clusters choose the document they keep. The writer puts the
(possibly redacted) text back into the record, so every other field (``id``, ``source``, ...)
reaches the output as it came in.
"""

from __future__ import annotations

import re
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer

from mtnlg.data.indexed import DataError
from mtnlg.data.jsonl import BadLine, parse_json_record

RECORD = "mtnlg_record"  # metadata key of the input record
TEXT_KEY = "mtnlg_text_key"
FILE_BITS = 32  # an order key is file index << 32 | line number
_WORD = re.compile(r"\w+")


def order_key(doc_id: str) -> int:
    """The integer order of a document id ``FILE:LINE``: input file first, then line."""
    file_index, _, line = doc_id.partition(":")
    return int(file_index) << FILE_BITS | int(line)


def where(inputs: list[str], doc_id: str) -> str:
    """``path:line`` of a document id, for messages and examples."""
    file_index, _, line = doc_id.partition(":")
    return f"{inputs[int(file_index)]}:{int(line)}"


class RecordReader(JsonlReader):
    """datatrove's JSONL reader with mtnlg's line rules: a bad line (invalid UTF-8, malformed JSON,
    not an object, missing or empty text) is counted under its kind and skipped, or with ``strict``
    stops the task with ``file:line: why``. Files are read as bytes, so one bad byte costs one line."""

    name = "mtnlg JSONL"
    _requires_dependencies: list = []

    def __init__(self, root: str, paths_file: str, files: list[str], text_key: str = "text",
                 strict: bool = False) -> None:
        super().__init__(root, paths_file=paths_file, text_key=text_key, compression=None, recursive=False)
        self.order = {name: i for i, name in enumerate(files)}
        self.strict = strict

    def read_file(self, filepath: str):  # noqa: ANN201 (a generator of Documents)
        index = self.order[filepath]
        shown = str(Path(self.data_folder.path) / filepath)
        with self.data_folder.open(filepath, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    self.stat_update("blank lines")
                    continue
                try:
                    record, text = parse_json_record(raw, self.text_key)
                except BadLine as exc:
                    if self.strict:
                        raise DataError(f"{shown}:{number}: {exc} (run without --strict to skip and count "
                                        "bad lines)") from None
                    self.stat_update(f"bad line: {exc.kind}")
                    continue
                record[self.text_key] = None
                self.stat_update("documents read")
                yield Document(text=text, id=f"{index:06d}:{number}",
                               metadata={RECORD: record, TEXT_KEY: self.text_key})


def restore_record(writer: JsonlWriter, doc: Document) -> dict:
    """The input record with the document's (possibly redacted) text: the output line of a kept document."""
    record = dict(doc.metadata[RECORD])
    record[doc.metadata[TEXT_KEY]] = doc.text
    return record


def record_writer(folder: str, filename: str = "${rank}.jsonl") -> JsonlWriter:
    """Kept documents as the input's JSONL records, one file per task."""
    return JsonlWriter(folder, output_filename=filename, compression=None, adapter=restore_record)


def staging_writer(folder: str) -> JsonlWriter:
    """Documents between stages, in datatrove's own layout (text, id, metadata), one file per task."""
    return JsonlWriter(folder, output_filename="${rank}.jsonl", compression=None)


class StagedReader(JsonlReader):
    """Reads exactly the staged file of its own task (``RANK.jsonl``), so that a stage after the
    MinHash signatures sees each task's documents in the order the signatures numbered them."""

    name = "mtnlg staged"

    def __init__(self, folder: str) -> None:
        super().__init__(folder, compression=None, recursive=False)

    def run(self, data=None, rank: int = 0, world_size: int = 1):  # noqa: ANN001, ANN201
        name = f"{rank:05d}.jsonl"
        if self.data_folder.isfile(name):
            yield from self.read_files_shard([name])


class Words(WordTokenizer):
    """Lowercase ``\\w+`` words (no NLTK data to download), padded to ``ngram`` words so that a
    document shorter than one shingle still has a signature (and its exact copies are found)."""

    def __init__(self, ngram: int) -> None:
        super().__init__("mtnlg")
        self.ngram = ngram

    def word_tokenize(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        return words + [""] * (self.ngram - len(words)) if words else []

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]
