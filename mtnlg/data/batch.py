"""The batch contract between the data and every training step: what a micro-batch tensor holds.

Pretraining samples are token rows (b, T + 1); fine-tuning samples stack rows (b, 2 or 3, T + 1)
of tokens, labels and, when packed, document ids (``mtnlg.data.sft``). ``split_batch`` turns
either into the model's inputs, targets and further forward arguments.
"""

from __future__ import annotations

import torch

from mtnlg.config import ConfigError

TOKENS, LABELS, DOCUMENTS = 0, 1, 2  # the rows of a fine-tuning sample


def split_batch(batch: torch.Tensor, pipeline: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Inputs (b, T), targets (b, T) and further forward arguments of a micro-batch.

    Pretraining batches are token rows (b, T + 1), whose targets are the tokens shifted by one;
    fine-tuning batches (b, 2 or 3, T + 1) carry labels, and document ids when packed. A pipeline
    schedule passes no document ids between stages, so it takes padded samples only.
    """
    if batch.dim() == 2:
        return batch[:, :-1], batch[:, 1:], {}
    extra = {"document_ids": batch[:, DOCUMENTS, :-1]} if batch.shape[1] > DOCUMENTS else {}
    if extra and pipeline:
        raise ConfigError("packed fine-tuning samples cannot run through a pipeline: use --finetune.pack=false")
    return batch[:, TOKENS, :-1], batch[:, LABELS, 1:], extra
