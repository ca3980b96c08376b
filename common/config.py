"""Loading TOML config files into validated msgspec Structs, with errors that name the bad key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import msgspec

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file that cannot be read or does not match its schema."""


def load_toml(path: str | Path, kind: type[T]) -> T:
    """Read `path` and validate it as `kind`; unknown keys, wrong types and bad values raise ConfigError."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        return msgspec.toml.decode(text, type=kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_explain(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ValueError as exc:  # raised by __post_init__ checks
        raise ConfigError(f"{path}: {exc}") from None


def _explain(message: str) -> str:
    """Name the full TOML key: msgspec says e.g. "Object contains unknown field `prot` - at `$.mqtt`"."""
    what, _, where = message.partition(" - at `$")
    section = where.rstrip("`").lstrip(".")
    for phrase, verdict in (
        ("Object contains unknown field `", "unknown key"),
        ("Object missing required field `", "missing key"),
    ):
        if what.startswith(phrase):
            field = what[len(phrase) :].rstrip("`")
            return f"{verdict} '{section + '.' if section else ''}{field}'"
    return f"key '{section}': {what}" if section else what


def to_toml(config: msgspec.Struct) -> str:
    """A config as TOML text (unset optional keys, None, are left out); needs the tomli-w package."""
    import tomli_w

    def drop_none(value):
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [drop_none(v) for v in value]
        return value

    return tomli_w.dumps(drop_none(msgspec.to_builtins(config)))
