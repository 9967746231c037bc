"""Command-line option types shared by the subcommands, so an impossible value is one usage line.

argparse turns the ``ArgumentTypeError`` these raise into ``error: cxrflow <command>: argument
--seed: ...`` and exit status 2, before anything runs.
"""

from __future__ import annotations

import argparse

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
            "by validation AUC, so validation cannot be empty")
    return value


def probability(text: str) -> float:
    """argparse type of a rate such as ``--audit-fpr``: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), got {text!r}")
    return value
