"""The training loss as a function of the model's output, outside its forward.

A pipeline schedule calls it on the last stage's logits (``loss_fn``); under tensor parallelism
the same call runs inside ``loss_parallel()`` on logits split by vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T); -100 is ignored.

    Computed in fp32 whatever the logits' dtype: the log-sum-exp over a large vocabulary loses
    too much in bf16/fp16.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
