"""Configuration: the typed sections (``sections``), how a Config is built from a preset, a file and
overrides (``build``), the named model shapes (``presets``), the block-family switches (``families``), the
optimizer / schedule / precision choices (``recipe``) and the TOML / reference text (``text``).

The names most code needs are re-exported here (``from mtnlg.config import Config, ConfigError``).
May import: ``mtnlg.util``.
"""

from mtnlg.config.build import (
    apply_settings,
    build_config,
    changes,
    config_from_dict,
    field_help,
    load_file,
    parse_overrides,
    runtime_fields,
    set_field,
    update,
)
from mtnlg.config.presets import PRESETS, get_preset
from mtnlg.config.sections import (
    Config,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    GenerateConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)

__all__ = [
    "PRESETS", "Config", "ConfigError", "DataConfig", "FinetuneConfig", "GenerateConfig", "ModelConfig",
    "ParallelConfig", "TrainConfig", "apply_settings", "build_config", "changes", "config_from_dict", "field_help",
    "get_preset", "load_file", "parse_overrides", "runtime_fields", "set_field", "update",
]
