"""The one exception type for errors a user can cause and fix.

The CLI prints it as a single line ``error: <file>:<line>: <problem>`` and exits with status 2; control
characters of file names in it are escaped (:func:`cxrflow.names.printable`), so it never drives the terminal.
Bugs are not wrapped: they raise normally, with a traceback.
"""

from __future__ import annotations

from os import PathLike

from cxrflow.names import printable


class CxrflowError(Exception):
    """A problem with the user's input (file, option, environment), with where it is."""

    def __init__(self, message: str, path: str | PathLike[str] | None = None, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:" + (f"{self.line}:" if self.line is not None else "") + " "
        return printable(f"{where}{self.message}")
