"""What several commands share: checks they make in ``run`` before importing their stage."""

from __future__ import annotations

import argparse
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


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """The subgroup audit's options, the same wherever an evaluation is written (evaluate, ensemble)."""
    parser.add_argument(
        "--no-audit", dest="audit", action="store_false", help="skip the subgroup audit (subgroups.csv)"
    )
    parser.add_argument(
        "--audit-fpr",
        type=options.probability,
        default=0.2,
        help="false-positive rate of the audit's one global 'no finding' threshold (default: 0.2)",
    )
