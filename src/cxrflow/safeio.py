"""Reading cxrflow's own files (and the files it parses) safely: regular files only, under a size bound.

Two families of hostile files meet here:

- **Not a regular file.** A named pipe in place of a run's ``config.json``, an evaluation's
  ``metrics.json`` or ``roc.png`` or a store's part would block the reader forever; a device would
  be read without end. :func:`open_regular` opens without blocking and checks the open file itself
  (no window between a check and the open); :func:`regular_file` checks a path that a library
  (torch, PIL, pyarrow) opens by name.
- **Too large.** A 30 GB sparse ``_manifest.json`` or ``.yaml`` costs nothing on disk and ends in a
  MemoryError when read whole. :func:`read_bytes` / :func:`read_text` / :func:`read_json` refuse a
  file larger than the bound of what it is, with one line naming file, size and bound. YAML is
  parsed without aliases (:func:`load_yaml`), so a "billion laughs" value cannot expand.

Every refusal is an :class:`UnreadableFile`: a :class:`~cxrflow.errors.CxrflowError` naming the file
(one error line), and a ValueError, so that callers which skip an unreadable optional file still do.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from cxrflow.errors import CxrflowError


class UnreadableFile(CxrflowError, ValueError):
    """A file cxrflow would parse that is not a regular file, too large, or not text / JSON."""


MiB = 1 << 20
#: Size bounds, by what a file is: far above any real one, far below what would exhaust memory.
CONFIG_BYTES = 16 * MiB  # settings files (.json, .yaml, .toml), run configs, markers
JSON_BYTES = 512 * MiB  # manifests, metrics, localization and other cxrflow JSON
CSV_BYTES = 2048 * MiB  # split lists and metadata tables cxrflow reads whole
IMAGE_BYTES = 1024 * MiB  # one image file (PNG, JPEG, DICOM)

_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)  # fmt: skip


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words ("a named pipe")."""
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _refuse_kind(mode: int, path: Any, what: str) -> UnreadableFile:
    return UnreadableFile(f"is {kind_of(mode)}, not a regular file; expected {what}", path)


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` when it is a regular file (links followed), else one CxrflowError saying what it is
    (FileNotFoundError, as from ``open``, when there is nothing there).

    For files a library opens by name; nothing is opened here, so a pipe is never read or blocked on.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnreadableFile(f"unreadable {what}: {exc.strerror or exc}", path) from None
    if not stat.S_ISREG(mode):
        raise _refuse_kind(mode, path, what)
    return Path(path)


def check_size(size: int, limit: int, path: Any, what: str, error: type[CxrflowError] | None = None) -> None:
    """One CxrflowError (``error``, by default :class:`UnreadableFile`) when a ``size``-byte file is over
    the ``limit`` of ``what`` it is."""
    if size > limit:
        raise (error or UnreadableFile)(
            f"is {size:,} bytes, over the {limit:,}-byte bound of a {what}; not read (is it the right file?)", path
        )


def open_regular(path: str | os.PathLike, what: str, limit: int | None = None) -> BinaryIO:
    """``path`` opened for binary reading, when it is a regular file (and at most ``limit`` bytes).

    Opened without blocking (a pipe neither hangs nor loses data), then the open file is checked.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:  # as from open(): callers tell a missing file from a bad one
        raise
    except OSError as exc:
        raise UnreadableFile(f"unreadable {what}: {exc.strerror or exc}", path) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse_kind(info.st_mode, path, what)
        if limit is not None:
            check_size(info.st_size, limit, path, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike, what: str, limit: int = JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (also when it grows while read)."""
    with open_regular(path, what, limit) as f:
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise UnreadableFile(f"unreadable {what}: {exc.strerror or exc}", path) from None
    check_size(len(data), limit, path, what)
    return data


def read_text(path: str | os.PathLike, what: str, limit: int = JSON_BYTES) -> str:
    """:func:`read_bytes` decoded as UTF-8 (a leading byte-order mark dropped); not text is one line."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"unreadable {what}: not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None


def read_json(path: str | os.PathLike, what: str, limit: int = JSON_BYTES) -> Any:
    """The JSON value of a regular file under ``limit``; unparsable is one CxrflowError."""
    text = read_text(path, what, limit)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UnreadableFile(f"unreadable {what}: {exc}", path) from None
    except RecursionError:
        raise UnreadableFile(f"unreadable {what}: nested too deeply", path) from None


def load_yaml(text: str, path: Any = None) -> Any:
    """``yaml.safe_load`` refusing aliases (``*name``): settings never need them, and nested aliases
    expand to billions of values ("billion laughs") once anything walks the result."""
    import yaml

    class _NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                line = event.start_mark.line + 1 if event.start_mark else None
                why = "cannot parse config: YAML aliases (*name) are not allowed in cxrflow settings"
                raise UnreadableFile(why, path, line)
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=_NoAliases)
