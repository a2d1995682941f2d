"""mtnlg: pretrain and serve GPT-style language models the Megatron-Turing NLG way."""

from mtnlg.config import Config, ConfigError, ModelConfig, build_config
from mtnlg.model import GPT, KVCache
from mtnlg.presets import PRESETS, get_preset

__version__ = "0.1.0"
__all__ = ["GPT", "KVCache", "Config", "ConfigError", "ModelConfig", "build_config", "PRESETS", "get_preset"]
