"""The kernel cache: emitted source in ``<cache dir>/<sha256>.py``, imported by path.

Triton reads a kernel's source with ``inspect``, so generated kernels must live in a real
file. The file name is the sha256 of the source, the Triton version and the dtypes and ranks
the kernel was specialised for; a second call with the same key in the same process returns
the memoised module without touching the disk.

Several processes may share the cache directory: a file is written to a temporary name in
the same directory and renamed into place, so a reader sees either no file or a whole one.
A file whose text is not the expected source (truncated by a crash, edited by hand) is
rewritten before it is imported.

The directory is ``$REWRITE_KERNEL_CACHE`` when set, else ``$XDG_CACHE_HOME/rewrite/kernels``
(``~/.cache/rewrite/kernels``); ``set_cache_dir`` changes it for this process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import types
from pathlib import Path

_lock = threading.Lock()
_modules: dict[str, types.ModuleType] = {}
_cache_dir: Path | None = None
stats = {"memory_hits": 0, "disk_hits": 0, "writes": 0, "repairs": 0}


def cache_dir() -> Path:
    if _cache_dir is not None:
        return _cache_dir
    if os.environ.get("REWRITE_KERNEL_CACHE"):
        return Path(os.environ["REWRITE_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rewrite" / "kernels"


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Use ``path`` for kernels emitted from now on (``None``: back to the default)."""
    global _cache_dir
    _cache_dir = None if path is None else Path(path)


def cache_key(source: str, specialisation: str = "") -> str:
    import triton

    text = "\0".join([source, triton.__version__, specialisation])
    return hashlib.sha256(text.encode()).hexdigest()


def load(source: str, specialisation: str = "") -> types.ModuleType:
    """The module holding ``source``, from memory, from the cache directory, or written there.

    ``specialisation`` names what the source was specialised for (dtypes, ranks, layouts);
    it is part of the key.
    """
    key = cache_key(source, specialisation)
    with _lock:
        module = _modules.get(key)
        if module is not None:
            stats["memory_hits"] += 1
            return module
        directory = cache_dir()
        path = directory / f"{key}.py"
        try:
            on_disk = path.read_text() if path.exists() else None
        except (OSError, UnicodeDecodeError):
            on_disk = ""
        if on_disk == source:
            stats["disk_hits"] += 1
        else:
            if on_disk is not None:
                stats["repairs"] += 1
            _write_atomically(directory, path, source)
            stats["writes"] += 1
        module = _import(key, path)
        _modules[key] = module
        return module


def _write_atomically(directory: Path, path: Path, source: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.stem[:16]}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other users may share the cache
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _import(key: str, path: Path) -> types.ModuleType:
    name = f"rewrite_kernel_{key[:24]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton's inspect-based source lookup wants the module registered
    spec.loader.exec_module(module)
    return module


def clear_memory() -> None:
    """Forget the modules loaded in this process (the files stay); for tests of the disk path."""
    with _lock:
        _modules.clear()
