"""Where tuning-cache files live, and which of them the runtime reads, in lookup order."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

USER_CACHE_FILE = "tuned.sqlite"
ROLE_OVERLAY = "FLASHMHF_CACHE"
ROLE_USER = "user"
ROLE_SHIPPED = "shipped"


def user_cache_dir() -> Path:
    """``FLASHMHF_CACHE_DIR`` if set, else the platform's per-user cache directory for flashmhf."""
    env = os.environ.get("FLASHMHF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("flashmhf"))


def user_cache_path() -> Path:
    """The user's own cache file (``tuned.sqlite``); the default target of `flashmhf tune` and `cache`."""
    return user_cache_dir() / USER_CACHE_FILE


def shipped_cache_paths() -> list[Path]:
    """Cache files shipped inside the package (``flashmhf/cache/shipped/*.sqlite``), sorted by name."""
    try:
        folder = resources.files("flashmhf.cache").joinpath("shipped")
        if not folder.is_dir():
            return []
        return sorted(Path(str(f)) for f in folder.iterdir() if f.name.endswith(".sqlite") and f.is_file())
    except (OSError, TypeError, ModuleNotFoundError):  # zipped or unusual installs: nothing shipped
        return []


def overlay_cache_paths() -> list[Path]:
    """Files named by ``FLASHMHF_CACHE`` (``os.pathsep``-separated), in the order given."""
    env = os.environ.get("FLASHMHF_CACHE", "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]


def cache_files_in_effect() -> list[tuple[Path, str]]:
    """(path, role) in lookup order: ``FLASHMHF_CACHE`` files, the user file, the shipped files.

    Overlay and user paths are listed even when the file does not exist (yet), so that
    `flashmhf doctor` can show them; readers skip missing files. Duplicates keep their first role.
    """
    out: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    entries = [(p, ROLE_OVERLAY) for p in overlay_cache_paths()]
    entries += [(user_cache_path(), ROLE_USER)]
    entries += [(p, ROLE_SHIPPED) for p in shipped_cache_paths()]
    for path, role in entries:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            out.append((path, role))
    return out
