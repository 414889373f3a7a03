"""How the cache code tells the user something: one ``CacheWarning`` per message (no log line too)."""

from __future__ import annotations

import re
import warnings

# C0/C1 control characters (escape sequences among them), but not newline and tab.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class CacheWarning(UserWarning):
    """A cache file skipped, a row skipped, a lock waited for, or tuned results this installation cannot use."""


def plain(text: str) -> str:
    """``text`` with control characters shown as escapes: text read from a cache file is data, and
    must never drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def warn(message: str, stacklevel: int = 3) -> None:
    warnings.warn(plain(message), CacheWarning, stacklevel=stacklevel)
