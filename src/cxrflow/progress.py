"""The one progress display of cxrflow: a tqdm bar on stderr while it is a terminal, nothing otherwise.

Training epochs, the ETL's images and the demo's stages all go through :class:`Progress`, so a log
file or a pipe gets only the lines a command prints itself (one per epoch, a summary), never
carriage returns and bars.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (progress is shown only there)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """A bar of ``total`` steps labelled ``label``; off when ``enabled`` is false or ``stream``
    (default stderr) is not a terminal. ``update(done, **numbers)`` sets the position and the
    numbers shown beside it (rounded); ``close()`` removes the bar."""

    def __init__(
        self, total: int, label: str, *, enabled: bool = True, unit: str = "it", stream: TextIO | None = None
    ) -> None:
        stream = sys.stderr if stream is None else stream
        self.bar = None
        if enabled and is_terminal(stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=label, unit=unit, file=stream, leave=False, dynamic_ncols=True, mininterval=0.2
            )

    @property
    def shown(self) -> bool:
        return self.bar is not None

    def update(self, done: int, **numbers: float) -> None:
        if self.bar is None:
            return
        if numbers:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in numbers.items()}, refresh=False)
        self.bar.update(done - self.bar.n)  # redrawn at most every 0.2 s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
