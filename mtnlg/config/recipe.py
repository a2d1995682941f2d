"""The choices of the optimisation recipe (optimizer, LR schedule, precision) and their validation.

Kept beside ``sections.py`` (which declares the fields) so the schema file stays one screenful per concern.
"""

from __future__ import annotations

from typing import Any

from mtnlg.config.errors import ConfigError

OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")


def validate_recipe(self: Any) -> None:
    """The recipe switches of ``TrainConfig`` (``self``), each error naming its field."""
    for name, allowed in (("precision", PRECISIONS), ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES)):
        if getattr(self, name) not in allowed:
            raise ConfigError(f"train.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
    if not 0 <= self.muon_momentum < 1:
        raise ConfigError(f"train.muon_momentum must be in [0, 1), got {self.muon_momentum:g}")
    if not 0 < self.decay_fraction <= 1:
        raise ConfigError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction:g}")
