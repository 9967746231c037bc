"""Command-line option types shared by the subcommands, so an impossible value is one usage line.

argparse turns the ``ArgumentTypeError`` these raise into ``error: cxrflow <command>: argument
--seed: ...`` and exit status 2, before anything runs.
"""

from __future__ import annotations

import argparse
import re

#: Seeds must fit every generator cxrflow seeds (numpy's legacy seeding takes 32 bits).
SEED_MAX = 2**32 - 1

#: Bootstrap resamples: far more than any percentile interval needs; beyond it only memory and time grow.
N_BOOT_MAX = 1_000_000


def _check_int(value: int, low: int, high: int, what: str, shown: str) -> int:
    """``value`` if it is an integer in low..high, else ValueError naming ``what`` and the range ``shown``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in {shown}, got {value!r}")
    return value


def _parse_int(text: str, check, shown: str) -> int:
    """``int(text)`` through ``check``, or the ArgumentTypeError argparse prints as one usage line."""
    try:
        return check(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in {shown}, got {text!r}") from None


def check_seed(value: int) -> int:
    """``value`` if it is a usable seed (0..SEED_MAX), else ValueError saying the range."""
    return _check_int(value, 0, SEED_MAX, "a seed", f"0..{SEED_MAX}")


def seed(text: str) -> int:
    """argparse type of ``--seed``: an integer in 0..SEED_MAX."""
    return _parse_int(text, check_seed, f"0..{SEED_MAX}")


def check_n_boot(value: int) -> int:
    """``value`` if it is a usable number of bootstrap resamples (1..N_BOOT_MAX), else ValueError."""
    return _check_int(value, 1, N_BOOT_MAX, "the number of bootstrap resamples", f"1..{N_BOOT_MAX:,}")


def n_boot(text: str) -> int:
    """argparse type of ``--n-boot``: an integer in 1..N_BOOT_MAX."""
    return _parse_int(text, check_n_boot, f"1..{N_BOOT_MAX:,}")


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (batch sizes, resamples)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}")
    return value


def val_fraction(text: str) -> float:
    """argparse type of ``--val-fraction``: a share strictly between 0 and 1.

    0 would leave validation empty, and training keeps its best epoch by validation AUC.
    """
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a number between 0 and 1 (exclusive), got {text!r}: training keeps its best epoch "
            "by validation AUC, so validation cannot be empty"
        )
    return value


#: What ``--device`` takes in every command (``cuda:N``: the N-th visible GPU).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_HELP = "auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda or cuda:N (default: auto)"


def check_device(text: str) -> str:
    """``text`` if it names a device cxrflow can use (whether that GPU exists is checked when it is
    used), else ValueError with the one message every command prints."""
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(text)):
        return text
    raise ValueError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")


def device(text: str) -> str:
    """argparse type of ``--device``: auto, cpu, cuda or cuda:N."""
    try:
        return check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device(
    parser: argparse.ArgumentParser, *, checked_by_parser: bool = True, default: str | None = "auto"
) -> None:
    """``--device`` with the same values, default and help in every command.

    ``checked_by_parser=False``: the command checks it itself with :func:`check_device` first thing in
    ``run`` (evaluate, predict and localize answer a bad device with their one error line and exit 2).
    """
    parser.add_argument(
        "--device",
        default=default,
        type=device if checked_by_parser else str,
        metavar="|".join(DEVICE_CHOICES),
        help=DEVICE_HELP,
    )


def add_batch_size(parser: argparse.ArgumentParser, default: int | None, what: str = "images per forward pass") -> None:
    """``--batch-size``: an integer of at least 1 in every command."""
    shown = "" if default is None else f" (default: {default})"
    parser.add_argument("--batch-size", type=positive_int, default=default, help=f"{what}{shown}")


def add_val_fraction(parser: argparse.ArgumentParser, default: float = 0.3) -> None:
    """``--val-fraction``: the share of the train_val patients that validation gets."""
    parser.add_argument(
        "--val-fraction",
        type=val_fraction,
        default=default,
        help=f"share of the train_val patients for validation (default: {default})",
    )


def probability(text: str) -> float:
    """argparse type of a rate such as ``--audit-fpr``: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), got {text!r}")
    return value
