"""The kernel cache: emitted source in ``<cache dir>/<sha256>.py``, run from its checked text.

The file name is the sha256 of the source, the Triton version and the dtypes and ranks the
kernel was specialised for; a second call with the same key in the same process returns the
memoised module without touching the disk.

Nothing read from the directory runs: the module is compiled from the source text in memory,
with the file's path as its file name, and no bytecode cache (``__pycache__``) is read or
written. Triton reads a kernel's source with ``inspect``, which reads ``linecache``; that is
seeded with the same text, so Triton compiles what was checked even if the file changes later.
The file is there for people and tools that open it (tracebacks, debuggers).

Several processes of one user may share the cache directory: a file is written to a temporary
name in the same directory and renamed into place, so a reader sees either no file or a whole
one. A file whose text is not the expected source (truncated by a crash, edited by hand) is
rewritten.

The directory is ``$REWRITE_KERNEL_CACHE`` when set, else ``$XDG_CACHE_HOME/rewrite/kernels``
(``~/.cache/rewrite/kernels``); ``set_cache_dir`` changes it for this process. It is created
owner-only (0o700, files 0o600) and refused with ``KernelCacheError`` when another user could
change what it holds: when it is owned by another user or writable by group or others, or when
a directory above it, through which it could be renamed and replaced, is owned by someone other
than us or root or is writable by others without the sticky bit (``/tmp`` is fine: there only
an entry's owner may rename it). A directory that cannot be created or written to raises the
same error, naming it and what to do.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import stat
import sys
import tempfile
import threading
import types
from pathlib import Path

_lock = threading.Lock()
_modules: dict[str, types.ModuleType] = {}
_cache_dir: Path | None = None
stats = {"memory_hits": 0, "disk_hits": 0, "writes": 0, "repairs": 0}

_ELSEWHERE = "use a private folder instead (set REWRITE_KERNEL_CACHE, or call codegen.set_cache_dir)"


class KernelCacheError(OSError):
    """The kernel cache directory cannot be used: it cannot be created or written to, or
    another user could change what it holds. The message names it and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message  # str() may grow on the way up: torch.fx appends the node it was running


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
        _check_private(directory)
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
            try:
                _write_atomically(path, source)
            except OSError as exc:
                raise KernelCacheError(
                    f"kernel cache directory {directory} cannot be written to ({exc.strerror or exc}): {_ELSEWHERE}"
                ) from exc
            stats["writes"] += 1
        module = _run(key, path, source)
        _modules[key] = module
        return module


def _check_private(directory: Path) -> None:
    """Create ``directory`` owner-only, or refuse it if another user could change what it holds:
    through it, or through a directory above it by renaming or replacing it (as ssh checks ~/.ssh)."""
    what = f"kernel cache directory {directory}"
    try:
        # one by one: mkdir(parents=True) would give the missing parents the umask's mode
        for missing in reversed([d for d in (directory, *directory.parents) if not d.exists()]):
            missing.mkdir(mode=0o700, exist_ok=True)
        real = Path(os.path.realpath(directory))
        info = real.stat()
    except OSError as exc:
        raise KernelCacheError(f"{what} cannot be created ({exc.strerror or exc}): {_ELSEWHERE}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise KernelCacheError(f"{what} is not a directory: {_ELSEWHERE}")
    me = os.geteuid()
    if info.st_uid != me:
        raise KernelCacheError(f"{what} belongs to another user (uid {info.st_uid}): {_ELSEWHERE}")
    if info.st_mode & 0o022:
        mode = stat.S_IMODE(info.st_mode)
        raise KernelCacheError(f"{what} is writable by other users (mode {mode:o}): run `chmod 700 {directory}`, "
                               f"or {_ELSEWHERE}")  # fmt: skip
    for parent in real.parents:
        info = parent.stat()
        if info.st_uid not in (0, me):
            why = f"belongs to another user (uid {info.st_uid})"
        elif info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:  # sticky (/tmp): only owners rename
            why = f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
        else:
            continue
        raise KernelCacheError(f"{what} could be replaced by another user: {parent}, above it, {why}; {_ELSEWHERE}")


def _write_atomically(path: Path, source: str) -> None:
    # mkstemp makes the file owner-only, like the directory: the cache is not shared between users
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _run(key: str, path: Path, source: str) -> types.ModuleType:
    """A module executing ``source``, the checked text, under the name of its file ``path``."""
    filename = str(path)
    # inspect (so Triton) reads sources through linecache: with no mtime, checkcache keeps this
    # entry, and the kernel's source stays the checked text whatever happens to the file.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    name = f"rewrite_kernel_{key[:24]}"
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module  # triton's inspect-based source lookup wants the module registered
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def clear_memory() -> None:
    """Forget the modules loaded in this process (the files stay); for tests of the disk path."""
    with _lock:
        _modules.clear()
