"""Atomic file writes: write beside the destination under a temporary name, then rename.

A crash leaves either the old file or the new one, never half of one. Every output of cxrflow
(manifests, configs, checkpoints, metrics, tables, figures) goes through :func:`atomic_path`;
:func:`read_json_object` reads its JSON files back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cxrflow.errors import CxrflowError
from cxrflow.safeio import UnreadableFile, read_json


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    ``suffix`` lets writers that infer the format from the name (matplotlib) see the real one.
    The file gets a normal mode (0666 less the umask), not mkstemp's private 0600; a file it replaces
    keeps its own mode (a private file stays private).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, _mode_of(path, 0o666 & ~umask))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _mode_of(path: Path, default: int) -> int:
    """The permission bits of the regular file at ``path``, else ``default``."""
    try:
        info = os.lstat(path)
    except OSError:
        return default
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else default


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (numpy's too) replaced by None, for strict JSON."""
    if isinstance(obj, float) or type(obj).__name__ in ("float16", "float32", "float64"):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; NaN and infinities become ``null``.

    Python's json writes ``NaN``, which is not JSON (other readers reject the file), so this is the
    one place every JSON output of cxrflow goes through.
    """
    write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in one of cxrflow's files (``what``: "manifest", "run config", ...), or one
    CxrflowError naming the file: unreadable, not JSON, or not an object."""
    try:
        value = read_json(path, what)
    except UnreadableFile:
        raise
    except (OSError, ValueError) as exc:
        raise CxrflowError(f"unreadable {what}: {exc}", path) from None
    except RecursionError:
        raise CxrflowError(f"unreadable {what}: nested too deeply", path) from None
    if not isinstance(value, dict):
        raise CxrflowError(f"not a cxrflow {what}: expected a JSON object, got {type(value).__name__}", path)
    return value


def save_figure_atomic(fig: Any, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG to ``path`` atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
