"""The one table of sampling settings: each one's type, default, inclusive range and help.

Four places check these values: ``GenerateConfig`` (``--generate.temperature=...`` and a
checkpoint's ``[generate]``), ``SamplingParams.validate`` (every request the engine takes), the
HTTP request bodies (``mtnlg.serve.protocol``, whose OpenAPI schema publishes the bounds) and the
``mtnlg generate``/``chat`` flags. They all read this table, so a value one of them accepts is
accepted by all, and refused by all with the same message. It lives in ``mtnlg.config``, the lowest
package that needs it.

The ranges keep every float32 step of the sampler finite: temperatures are applied to
max-subtracted logits, so any T > 0 up to the bound is finite; a penalty in [1e-2, 1e2] keeps
float32 logits finite (|logit| < 3e36); seeds fit ``torch.Generator.manual_seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20  # as many alternatives as OpenAI's chat API returns
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Setting:
    """One numeric sampling setting. ``low_open``: the range excludes ``low`` (top_p > 0); ``note``
    says what a special value means, in help and errors."""

    kind: type  # int or float (bool is refused for both)
    default: float
    low: float
    high: float
    help: str
    note: str = ""
    low_open: bool = False

    @property
    def lowest(self) -> float:
        """The smallest accepted value (for an open range of floats, the next float above ``low``)."""
        return math.nextafter(self.low, math.inf) if self.low_open else self.low

    def range_text(self) -> str:
        """The range as written in messages and --help, e.g. ``[0, 100]`` or ``(0, 1]``."""
        return f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}]"

    def rule(self) -> str:
        """What a value must be, e.g. ``must be a number in [0, 100] (0 means greedy)``."""
        kind = "an integer" if self.kind is int else "a number"
        return f"must be {kind} in {self.range_text()}" + (f" ({self.note})" if self.note else "")

    def accepts(self, value: object) -> bool:
        """An int for integer settings, a finite int or float for float ones (never a bool), in range."""
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else int | float):
            return False
        if not math.isfinite(value):
            return False
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def check(self, name: str, value: object) -> None:
        """Raise ValueError ``"<name> must be ..., got <value>"`` (the message starts with the name:
        the HTTP server reports it as the offending parameter)."""
        if not self.accepts(value):
            raise ValueError(f"{name} {self.rule()}, got {value!r}")


def _num(value: float) -> str:
    """A bound as people write it: ``100``, ``0.01``, ``2**63 - 1``."""
    if value == 2**63 - 1:
        return "2**63 - 1"
    return str(int(value)) if float(value).is_integer() else repr(value)


SAMPLING: dict[str, Setting] = {
    "max_new_tokens": Setting(int, 64, 0, INT32_MAX, "Tokens to generate after the prompt."),
    "temperature": Setting(float, 1.0, 0.0, 100.0, "Softmax temperature.", note="0 means greedy"),
    "top_k": Setting(int, 0, 0, INT32_MAX, "Sample among the k most likely tokens.", note="0 disables"),
    "top_p": Setting(float, 1.0, 0.0, 1.0, "Sample from the smallest set with probability mass >= p.",
                     note="1 disables", low_open=True),
    "repetition_penalty": Setting(float, 1.0, 1e-2, 1e2, "Divide logits of already-seen tokens by this "
                                  "(CTRL style).", note="1 disables"),
    "seed": Setting(int, 0, 0, 2**63 - 1, "Seed of the sampler (same seed, same text)."),
    "logprobs": Setting(int, 0, 0, MAX_TOP_LOGPROBS, "Report the chosen token's log-probability and those "
                        "of the k most likely tokens."),
}
OPTIONAL = {"seed", "logprobs"}  # None is also accepted: drawn from the engine's seed stream / no log-probs


def sampling_help(name: str) -> str:
    """A setting's help with its range, for its config field, flag and HTTP schema description."""
    s = SAMPLING[name]
    return f"{s.help} In {s.range_text()}" + (f"; {s.note}." if s.note else ".")
