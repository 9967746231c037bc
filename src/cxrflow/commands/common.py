"""What several commands share: the device check of the commands that answer it in ``run``."""

from __future__ import annotations

from cxrflow import options
from cxrflow.errors import CxrflowError


def checked_device(text: str) -> str:
    """:func:`cxrflow.options.check_device` as the command's one error line (exit 2)."""
    try:
        return options.check_device(text)
    except ValueError as exc:
        raise CxrflowError(str(exc)) from None
