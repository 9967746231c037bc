"""The ``cxrflow`` command: one subcommand per pipeline stage.

Each subcommand is a module of :mod:`cxrflow.commands` with ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up. Only the selected subcommand's module is imported,
and those import the heavy libraries (torch, scikit-learn, pyspark) inside ``run``, so ``--help`` and
a mistyped option answer at once.
A :class:`~cxrflow.errors.CxrflowError` becomes one ``error: ...`` line and exit status 2; library
warnings are shown after it, one line each; output piped into ``head`` stops quietly. Ctrl-C and
SIGTERM unwind the command (every clean-up runs, Spark's JVM is ended) and exit 130 and 143.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
import warnings

from cxrflow import __version__
from cxrflow.errors import CxrflowError
from cxrflow.names import printable

#: (subcommand, module, one-line description) in pipeline order.
COMMANDS: list[tuple[str, str, str]] = [
    ("synth", "cxrflow.commands.synth", "write a synthetic dataset in the NIH ChestX-ray14 release format"),
    (
        "explore",
        "cxrflow.commands.explore",
        "dataset statistics and figures from the metadata (the paper's data section)",
    ),
    ("split", "cxrflow.commands.split", "patient-level train/val/test split as CSV"),
    ("etl", "cxrflow.commands.etl", "Spark ETL: raw images to a multi-resolution Parquet store"),
    ("store-info", "cxrflow.commands.store_info", "print a Parquet store's manifest"),
    ("train", "cxrflow.commands.train", "train a model from the store in two stages (knowledge transfer, fine-tuning)"),
    ("evaluate", "cxrflow.commands.evaluate", "per-finding test AUC with confidence intervals, ROC and loss figures"),
    ("ensemble", "cxrflow.commands.ensemble", "combine evaluated runs (mean or stacked) into an evaluated ensemble"),
    (
        "report",
        "cxrflow.commands.report",
        "report.html (the whole study on one page) and the paper's Table 1 over several runs",
    ),
    ("sweep", "cxrflow.commands.sweep", "train, evaluate and report every run listed in a config file"),
    (
        "localize",
        "cxrflow.commands.localize",
        "heatmaps against ground-truth boxes: the ChestX-ray14 localization benchmark",
    ),
    ("predict", "cxrflow.commands.predict", "finding probabilities for new image files"),
    ("export", "cxrflow.commands.export", "a run's model as an MLflow model folder (serving, batch) or an ONNX graph"),
    ("demo", "cxrflow.commands.demo", "end-to-end demo on a synthetic dataset"),
]


#: Errors of the machine, not of cxrflow: a full or read-only disk, a quota, missing permissions.
#: They are one line naming the file (or the output being written), like any other user error.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error:`` line with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the ``selected`` subcommand's module is imported."""
    parser = _Parser(
        prog="cxrflow",
        description="cxrflow: chest X-ray images to an evaluated multi-label disease classifier.",
    )
    parser.add_argument("--version", action="version", version=f"cxrflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if args.command is None and not argv else 2
    caught: list[warnings.WarningMessage] = []
    log = _OneLineLog()
    logging.root.addHandler(log)
    previous = _on_sigterm(_terminate)
    try:
        with warnings.catch_warnings(record=True) as caught:
            code = int(args._run(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return code
    except BaseException as exc:
        code = _failure(exc, getattr(args, "out", None))
        if code is None:  # a bug: a traceback
            raise
        return code
    finally:
        _on_sigterm(previous)
        logging.root.removeHandler(log)
        _show_warnings(caught)


def _failure(exc: BaseException, out: str | None) -> int | None:
    """The exit status of a command that raised ``exc``, after its one line on stderr; None for a bug.

    An interrupt comes first, also when a library's clean-up failed while it unwound (py4j's calls
    after Ctrl-C): the interrupt is the cause, the clean-up's error its consequence.
    """
    interrupt = _interrupt_behind(exc)
    if interrupt is not None:
        terminated = isinstance(interrupt, Terminated)
        print("error: terminated" if terminated else "error: interrupted", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    if isinstance(exc, CxrflowError):
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    if isinstance(exc, BrokenPipeError):
        # the reader (``| head``) has what it wanted: stop quietly, with the status of a SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    if isinstance(exc, OSError) and (exc.errno in ENVIRONMENT_ERRNOS or exc.filename is not None):
        print(f"error: {environment_error(exc, out)}", file=sys.stderr)  # an OSError of a path is the user's
        return 2
    return None


def _interrupt_behind(exc: BaseException | None) -> KeyboardInterrupt | None:
    """``exc`` if it is Ctrl-C or SIGTERM, else the one it was raised while handling (if any)."""
    seen = 0
    while exc is not None and seen < 50:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as a kind of Ctrl-C's KeyboardInterrupt so that every ``finally`` runs and every
    library cleans up as on Ctrl-C (py4j closes the connection it was using): a Spark session's JVM is
    ended and partial outputs are removed (by default SIGTERM ends Python at once)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM and return the one it replaces (None outside the main thread)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a sweep's runs, tests): the main thread's handler stands
        return None


class _OneLineLog(logging.Handler):
    """Library records on the root logger, one line each and never a traceback (without a handler
    there, ``logging.exception`` in py4j printed one when Ctrl-C reached a Spark call). An
    interrupt's own records (and those of clean-ups failing because of it) are dropped: the CLI says
    "interrupted" once."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and _interrupt_behind(record.exc_info[1]) is not None:
            return  # an interrupt's record, or one of a clean-up that failed while it unwound
        try:
            text = (record.getMessage().strip().splitlines() or [""])[0]
            # led by the logger's name: a library's "error" is never mistaken for cxrflow's one error line
            print(printable(f"{record.name}: {record.levelname.lower()}: {text[:300]}"), file=sys.stderr)
        except Exception:  # a record whose message cannot be formatted must not end the command
            self.handleError(record)


def environment_error(exc: OSError, out: str | None) -> str:
    """One line for a disk or permission failure: the file (else the output being written) and the fix."""
    where = exc.filename or out
    fix = (
        "free some space and run again"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        else (
            "write somewhere you may write, or fix the permissions"
            if exc.errno in ENVIRONMENT_ERRNOS
            else "check the path"
        )
    )
    return printable(f"{where}: {exc.strerror or exc}; {fix}" if where else f"{exc.strerror or exc}; {fix}")


def _show_warnings(caught: list[warnings.WarningMessage], limit: int = 5) -> None:
    """Library warnings, one line each, after the command's own output (never burying an error line)."""
    seen: list[str] = []
    for w in caught:
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else w.category.__name__
        if text not in seen:
            seen.append(text)
    for text in seen[:limit]:
        print(f"warning: {printable(text[:300])}", file=sys.stderr)
    if len(seen) > limit:
        print(f"warning: ... and {len(seen) - limit} more", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
