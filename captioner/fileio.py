"""Atomic file writes shared by checkpoints, metrics and results files."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import IO, Any


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars (e.g. ids taken from a batch tensor) are not JSON-serializable as such
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file so readers never see a partial one: ``write(tmp)`` writes a temp file in the same directory
    (torch.save, safetensors' save_file, ...), which is fsynced and renamed over ``path``. The one atomic write
    for every file the project writes (checkpoint directories are swapped in whole by checkpoint.py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; keep an existing file's mode, else the usual 0644
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Make the directory ``path`` atomically: ``fill`` writes its files into a new directory beside it, which then
    replaces it (a failure leaves the previous one, or none, in place). Readable by others (a server may run as
    another user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        fill(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # the swap failed half-way: put the previous directory back
        raise
    return path


def write_text_atomic(path: str | os.PathLike, fill: Callable[[IO[str]], None]) -> None:
    """A text file written atomically: ``fill(f)`` writes to an open text file."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            fill(f)
    atomic_write(path, write)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> None:
    write_text_atomic(path, lambda f: json.dump(obj, f, ensure_ascii=False, indent=indent, default=_json_default))


def portable_path(value: str) -> str:
    """A path as recorded in files that travel (metrics.json, model cards): relative to the working directory when
    under it, else its last two parts (``/work/shared/data/flickr8k`` -> ``data/flickr8k``), so no machine's
    layout leaks into a shipped model. Anything that is not an absolute path is returned unchanged."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    p = Path(value)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(*p.parts[-2:])) if len(p.parts) > 2 else p.name


def portable(obj: Any) -> Any:
    """portable_path() on every string of a JSON-like structure."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    return portable_path(obj) if isinstance(obj, str) else obj
