"""What several commands share: checks they make in ``run`` before importing their stage."""

from __future__ import annotations

import os
from collections.abc import Iterable

from cxrflow import options
from cxrflow.errors import CxrflowError


def checked_device(text: str) -> str:
    """:func:`cxrflow.options.check_device` as the command's one error line (exit 2)."""
    try:
        return options.check_device(text)
    except ValueError as exc:
        raise CxrflowError(str(exc)) from None


def must_exist(paths: Iterable[str | os.PathLike | None], message: str) -> None:
    """The first of ``paths`` that does not exist as one error line (``message``), before the stage
    that would say the same is imported with its heavy libraries. None is skipped (not given)."""
    for path in paths:
        if path is None:
            continue
        try:
            os.lstat(path)
        except FileNotFoundError:
            raise CxrflowError(message, path) from None
        except OSError as exc:  # a name too long for the file system, a component that is a file, ...
            raise CxrflowError(f"{exc.strerror or exc}; check the path", path) from None
