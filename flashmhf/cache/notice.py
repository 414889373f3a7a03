"""How the cache code tells the user something: ``CacheWarning`` (one per message, no log line
too), and stored text made safe to print."""

from __future__ import annotations

import re

# C0/C1 control characters (escape sequences among them), but not newline and tab.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class CacheWarning(UserWarning):
    """A cache file skipped, a row skipped, a lock waited for, or tuned results this installation cannot use."""


def plain(text: str) -> str:
    """``text`` with control characters shown as escapes: text read from a cache file is data, and
    must never drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
