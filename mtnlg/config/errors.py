"""The error every bad configuration value raises (its own module: the schema and the tables beside it
all raise it)."""


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the field."""
