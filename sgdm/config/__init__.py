"""Typed, validated configuration (see :mod:`sgdm.config.core`)."""
from sgdm.config.core import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    require_at_least,
    to_dict,
)

__all__ = ["ConfigError", "apply_overrides", "dump_yaml", "from_dict", "load_config", "load_yaml", "require_at_least", "to_dict"]
