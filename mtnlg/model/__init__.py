"""The plain single-device model: the reference every parallel layout is tested against."""

from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache

__all__ = ["GPT", "KVCache"]
