"""Writing the files a command produces: never over an existing file unless asked, never through a
symbolic link, never half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def check_new_output(path: Path, *, force: bool) -> None:
    """Raise ``ValueError`` if ``path`` cannot take a new output file (``force``: an existing
    regular file may be replaced)."""
    if path.is_symlink():
        raise ValueError(f"{path}: is a symbolic link; refusing to write through it (give the real path)")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give a file name, e.g. {path / 'results.json'}")
    if path.exists() and not force:
        raise ValueError(f"{path}: already exists; use --force to replace it")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: is not a regular file")


def write_new(path: Path, write: Callable[[Path], object], *, force: bool = False) -> None:
    """Create ``path`` by ``write(tmp)`` on a temporary file in the same folder, then rename it into
    place: a reader never sees a partial file, and a symbolic link at ``path`` is never followed."""
    check_new_output(path, force=force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        tmp_path.unlink()  # the writer creates it (an SQLite copy must start from no file)
        write(tmp_path)
        if not force and path.exists():
            raise ValueError(f"{path}: appeared while writing; not replaced")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
