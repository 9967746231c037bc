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


def check_seed(value: int) -> int:
    """``value`` if it is a usable seed (0..SEED_MAX), else ValueError saying the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"a seed must be an integer in 0..{SEED_MAX}, got {value!r}")
    return value


def seed(text: str) -> int:
    """argparse type of ``--seed``: an integer in 0..SEED_MAX."""
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{SEED_MAX}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (batch sizes, resamples)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}")
    return value


def check_n_boot(value: int) -> int:
    """``value`` if it is a usable number of bootstrap resamples (1..N_BOOT_MAX), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= N_BOOT_MAX:
        raise ValueError(f"the number of bootstrap resamples must be an integer in 1..{N_BOOT_MAX:,}, got {value!r}")
    return value


def n_boot(text: str) -> int:
    """argparse type of ``--n-boot``: an integer in 1..N_BOOT_MAX."""
    try:
        return check_n_boot(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..{N_BOOT_MAX:,}, got {text!r}") from None
