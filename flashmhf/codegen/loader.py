"""Load rendered source as a real module (Triton reads kernel source from files), once per process."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from flashmhf.codegen.render import render
from flashmhf.codegen.spec import Spec

_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()


def kernel_dir() -> Path:
    """Where rendered sources are written: ``FLASHMHF_KERNEL_DIR`` or the user cache directory."""
    env = os.environ.get("FLASHMHF_KERNEL_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("flashmhf")) / "kernels"


def _write_once(path: Path, source: str) -> None:
    """Content-addressed, so an existing file is already right; write atomically otherwise."""
    if path.exists() and path.read_text(encoding="utf-8") == source:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(source)
    os.replace(tmp, path)


def load_source(source: str, name_hint: str = "kernel") -> ModuleType:
    """Import ``source`` through a content-addressed file; the same source is loaded only once."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    with _lock:
        module = _modules.get(digest)
        if module is not None:
            return module
        mod_name = f"flashmhf_generated_{name_hint}_{digest}"
        path = kernel_dir() / f"{mod_name}.py"
        _write_once(path, source)
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{path}: cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # Triton's JIT looks kernels' globals up through their module
        spec.loader.exec_module(module)
        _modules[digest] = module
        return module


def load(spec: Spec) -> ModuleType:
    """Render (memoised) and load the kernel module for ``spec``."""
    return load_source(render(spec), spec.kind)
