"""``LazyPackedLinear``: the base of the quantized Linear layers whose kernel wants its weights
in a packed form of its own (``int8``'s fbgemm prepack, ``int4``'s int4pack).

The packed form is not saved: the layer's buffers (what the checkpoint stores) are the truth,
and the packed form is built from them on the first forward and again after every state-dict
load (a load replaces the buffers, and a stale packed form would keep computing with the old
weights).
"""

from __future__ import annotations

from typing import Any

from torch import nn


class LazyPackedLinear(nn.Module):
    """A Linear layer whose kernel runs on ``self.packed``, which ``_pack`` builds from the buffers."""

    def __init__(self) -> None:
        super().__init__()
        self._packed: Any = None

    def _pack(self) -> Any:
        """The kernel's form of the weights, from the buffers (each subclass its own)."""
        raise NotImplementedError

    @property
    def packed(self) -> Any:
        """The kernel's form of the weights, built on first use."""
        if self._packed is None:
            self._packed = self._pack()
        return self._packed

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]
        self._packed = None
