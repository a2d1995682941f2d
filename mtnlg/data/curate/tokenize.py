"""The last stage of curation, optionally: each task's kept documents tokenized into one Megatron
``.bin``/``.idx`` shard (``TOKENS/RANK``), written by mtnlg's indexed writer (complete or absent).
``mtnlg merge`` joins the shards into one dataset."""

from __future__ import annotations

from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from mtnlg.data.indexed import IndexedDatasetWriter, token_dtype


class MegatronShards(PipelineStep):
    """Tokenizes each document (end-of-document token appended, as ``mtnlg preprocess`` does)."""

    type = "mtnlg"
    name = "tokenize to .bin/.idx"

    def __init__(self, tokenizer: str, folder: str) -> None:
        super().__init__()
        self.tokenizer, self.folder = tokenizer, folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from mtnlg.data.tokenizer import Tokenizer

        tok = Tokenizer.load(self.tokenizer)
        with IndexedDatasetWriter(Path(self.folder) / f"{rank:05d}", token_dtype(tok.vocab_size)) as writer:
            for doc in data:
                with self.track_time():
                    ids = tok.encode(doc.text)
                    ids.append(tok.eod_id)
                    writer.add_document(ids)
                    self.stat_update("tokens", value=len(ids))
                yield doc
            writer.finalize()
