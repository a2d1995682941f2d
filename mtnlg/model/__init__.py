"""The plain single-device model: the reference every parallel layout is tested against.

``gpt`` (embedding -> blocks -> norm -> head, the family switches), ``rope`` (rotary positions),
``moe`` (mixture-of-experts layers), ``kv_cache``, ``loss``, ``counts`` (parameters and FLOPs from
the config alone) and ``hf`` (one Hugging Face name table per family, read in both directions).
Never imports ``torch.distributed``.

May import: ``mtnlg.util``, ``mtnlg.config``.
"""

from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache

__all__ = ["GPT", "KVCache"]
