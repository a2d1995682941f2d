"""mtnlg: pretrain and serve GPT-style language models the Megatron-Turing NLG way.

The public names load lazily, so commands that never touch a model (``mtnlg corpus``,
``mtnlg preprocess``, ``mtnlg dedup``) don't pay torch's import time in every worker.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtnlg.util.extras import VERSION as __version__  # noqa: F401 (the package version, re-exported)

_EXPORTS = {
    "GPT": "mtnlg.model.gpt",
    "KVCache": "mtnlg.model.kv_cache",
    "Config": "mtnlg.config",
    "ConfigError": "mtnlg.config",
    "ModelConfig": "mtnlg.config",
    "build_config": "mtnlg.config",
    "PRESETS": "mtnlg.config.presets",
    "get_preset": "mtnlg.config.presets",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mtnlg' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
