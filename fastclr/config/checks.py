"""The validation helpers every config section uses; errors name the field."""
from __future__ import annotations

from typing import get_args


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


def _at_least(section_obj, section: str, low: int, *names: str) -> None:
    for name in names:
        value = getattr(section_obj, name)
        _check(value >= low, f"{section}.{name}", f"must be >= {low}, got {value}")


def choices(literal) -> tuple[str, ...]:
    """The values a ``Literal[...]`` choice type admits."""
    return get_args(literal)


def _check_choice(value: str, literal, name: str, what: str) -> None:
    _check(value in choices(literal), name, f"unknown {what} '{value}'; choose one of {choices(literal)}")
