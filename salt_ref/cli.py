"""Argument types shared by the command lines (``salt_ref.train``, ``salt_ref.sample``): strings parsed once here.

Every type turns a flag's text into the typed value the library takes (a :class:`~salt_ref.kv_cache.MemoryPolicy`,
a positive count, a boolean) or raises ``argparse.ArgumentTypeError``; :class:`Parser` prints that as one
``error:`` line and exits with code 2, without the usage dump.
"""

from __future__ import annotations

import argparse

from salt_ref.kv_cache import MemoryPolicy

__all__ = ["Parser", "memory_policy", "positive_int", "boolean"]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit code 2."""

    def error(self, message: str) -> None:  # one line, exit 2: no usage dump for a typo
        self.exit(2, f"error: {message} (see --help)\n")


def memory_policy(spec: str) -> MemoryPolicy:
    """``full``, ``window:N`` or ``sink:S+window:N`` as a :class:`MemoryPolicy`."""
    try:
        return MemoryPolicy.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def boolean(text: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``)."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
