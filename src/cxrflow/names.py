"""Names that become file names or terminal text: one place that makes them safe.

- :func:`file_part` turns a finding, image stem or other name into one file-name component
  (no separators, no leading dot, no control characters, bounded length); :func:`file_parts` does it
  for a list and keeps the results distinct, so two names never share one file.
- :func:`path_tag` is a short, stable tag of a file's absolute path, for outputs of files that share a
  name in different folders (``d1/x.png``, ``d2/x.png``).
- :func:`printable` escapes control characters (terminal escape sequences) of a name, repr-style, for
  printing in tables and error lines.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata

#: Longest component :func:`file_part` returns (file systems allow 255 bytes; others are added around it).
MAX_PART = 80

_UNSAFE = re.compile(r"[^\w .+()-]", re.UNICODE)


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def file_part(name: str, max_len: int = MAX_PART) -> str:
    """``name`` as one safe file-name component; a name already safe (``Mass``, ``Pleural Thickening``)
    is kept, anything else is sanitised and tagged with a hash of the original, so it stays distinct."""
    text = unicodedata.normalize("NFC", str(name))
    safe = _UNSAFE.sub("_", text).strip(" .") or "_"
    if safe == text and len(safe.encode()) <= max_len:
        return safe
    tag = "-" + _digest(str(name))
    room = max_len - len(tag)
    while len(safe.encode()) > room:
        safe = safe[:-1]
    return safe + tag


def file_parts(names: list[str], max_len: int = MAX_PART) -> dict[str, str]:
    """:func:`file_part` of each distinct name, distinct from each other (also ignoring case, for
    file systems that do)."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for name in dict.fromkeys(names):
        part = file_part(name, max_len)
        if part.casefold() in seen:
            part = file_part(part + "\0" + name, max_len)  # forced through the tagged form
        seen.add(part.casefold())
        out[name] = part
    return out


def path_tag(path: str | os.PathLike) -> str:
    """Eight hex digits naming ``path``'s absolute location (same file, same tag; other folder, other tag)."""
    return _digest(os.path.abspath(os.fspath(path)))


def printable(name: object) -> str:
    """``name`` with control and other unprintable characters escaped repr-style (``\\x1b``, ``\\n``),
    so printing it never drives the terminal; ordinary text (accents included) is unchanged."""
    text = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
