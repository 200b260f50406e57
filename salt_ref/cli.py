"""Argument types shared by the command lines (``salt_ref.train``, ``salt_ref.sample``): strings parsed once here.

Every type turns a flag's text into the typed value the library takes (a :class:`~salt_ref.kv_cache.MemoryPolicy`,
a positive count, a boolean) or raises ``argparse.ArgumentTypeError``; :class:`Parser` prints that as one
``error:`` line and exits with code 2, without the usage dump.
"""

from __future__ import annotations

import argparse

from salt_ref.kv_cache import MemoryPolicy

__all__ = ["Parser", "HelpFormatter", "memory_policy", "positive_int", "non_negative_int", "boolean"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every flag's default, shown once: not for ``None`` (the help text says what happens
    then) nor for on/off switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if quiet or "default" in text:  # (``in (None, False)`` would also catch a default of 0)
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit code 2, with :class:`HelpFormatter`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2: no usage dump for a typo
        self.exit(2, f"error: {message} (see --help)\n")


def memory_policy(spec: str) -> MemoryPolicy:
    """``full``, ``window:N`` or ``sink:S+window:N`` as a :class:`MemoryPolicy`."""
    try:
        return MemoryPolicy.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (an iteration budget: 0 skips the stage)."""
    return _int_at_least(text, 0)


def boolean(text: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``)."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
