"""Typed config loading: nested dataclasses from TOML, `FEDSILO_*` variables and `--set` flags."""

from fedsilo.sdk.config.loader import (
    ConfigError,
    NamesOrPaths,
    TaggedConfig,
    config_keys,
    config_to_dict,
    dump_toml,
    load_config,
    unmatched_env_vars,
)

__all__ = [
    "ConfigError",
    "NamesOrPaths",
    "TaggedConfig",
    "config_keys",
    "config_to_dict",
    "dump_toml",
    "load_config",
    "unmatched_env_vars",
]
