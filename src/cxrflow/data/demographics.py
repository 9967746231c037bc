"""Age, sex and view position: one encoding for model input, unknown values, predict's input, and the shortcut rule.

Every path that turns demographics into numbers (the loader for training and evaluation,
``cxrflow predict`` for new files) goes through :func:`encode_arrow`, so a fused model sees the
same numbers wherever it is used. The tensor is float32 ``[N, 3]`` = (age, sex, view):

- age: ``age / 100`` for ages ``1..120`` years; anything else (0, the release's 414, null) is unknown;
- sex: ``M`` = 0, ``F`` = 1 (also ``Male``/``Female``, any case); anything else is unknown;
- view: ``PA`` = 0, ``AP`` = 1 (any case); anything else is unknown.

Unknown is NaN in that tensor, never a number: the fused model's demographic term
(:class:`cxrflow.modelling.fusion.DemographicLogits`) turns each field into a (standardised value,
known) pair, the value 0 where unknown, so the model learns what "unknown" means instead of
trusting a placeholder. The store keeps the raw values; the ETL's
manifest counts the unknown ones (:func:`count_unknown`).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrflow.errors import CxrflowError

FIELDS = ("age", "sex", "view")
#: Ages (years) taken as known; 0 and above 120 are data-entry errors in the NIH release.
AGE_RANGE = (1, 120)
AGE_SCALE = 100.0
#: Accepted spellings (upper-cased) and their value; index i of _SEX_SPELLINGS means value i % 2.
_SEX_SPELLINGS = ("M", "F", "MALE", "FEMALE")
_VIEW_SPELLINGS = ("PA", "AP")
#: Words that mean "not known" on the command line and in a --metadata CSV.
UNKNOWN_WORDS = ("", "unknown", "?", "na", "n/a")

#: Fusion methods ``--fusion`` accepts ("none": image only).
FUSIONS = ("none", "demographics")
#: The exact encoding, recorded in a fused run's config.
ENCODING: dict[str, Any] = {
    "columns": list(FIELDS),
    "age": {"value": f"age / {AGE_SCALE:g}", "known": f"{AGE_RANGE[0]} <= age <= {AGE_RANGE[1]} years"},
    "sex": {"value": {"M": 0, "F": 1}, "aliases": {"Male": "M", "Female": "F"}, "case": "ignored"},
    "view": {"value": {"PA": 0, "AP": 1}, "case": "ignored"},
    "unknown": "NaN in the [N, 3] tensor; the model sees (standardised value 0, known flag 0)",
    "term": "per finding, a logistic term on (3 values standardised on the training split, 3 known flags) "
    "added to the image logits; fitted by logistic regression on the training split before training",
}


def fusion_record(fusion: str) -> dict[str, Any]:
    """What a run's config records about its fusion (the encoding only when it has one)."""
    return {"fusion": fusion, **({"demographics_encoding": ENCODING} if fusion == "demographics" else {})}


def check_fusion(fusion: str) -> str:
    if fusion not in FUSIONS:
        raise CxrflowError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    return fusion


# --- encoding ------------------------------------------------------------------------------------


def _coded(values: pa.Array, spellings: Sequence[str]) -> np.ndarray:
    """float64: the index (mod 2) of each upper-cased value among ``spellings``; NaN otherwise."""
    upper = pc.utf8_upper(pc.utf8_trim_whitespace(values.cast(pa.string())))
    index = pc.index_in(upper, value_set=pa.array(spellings)).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.where(np.isnan(index), np.nan, index % 2)


def encode_arrow(age: pa.Array, sex: pa.Array, view: pa.Array) -> np.ndarray:
    """float32 ``[N, 3]``: (age / 100, sex F=1, view AP=1), NaN where unknown (see the module doc)."""
    years = age.cast(pa.float64()).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        known = (years >= AGE_RANGE[0]) & (years <= AGE_RANGE[1])
    out = np.empty((len(years), 3), dtype=np.float32)
    out[:, 0] = np.where(known, years / AGE_SCALE, np.nan)
    out[:, 1] = _coded(sex, _SEX_SPELLINGS)
    out[:, 2] = _coded(view, _VIEW_SPELLINGS)
    return out


def encode(rows: Sequence[tuple[float | None, str | None, str | None]]) -> np.ndarray:
    """:func:`encode_arrow` for Python values ``(age or None, sex, view)``."""
    ages, sexes, views = zip(*rows) if rows else ((), (), ())
    return encode_arrow(
        pa.array([None if a is None else float(a) for a in ages], pa.float64()),
        pa.array(sexes, pa.string()),
        pa.array(views, pa.string()),
    )


def count_unknown(age: Sequence | pa.Array, sex: Sequence | pa.Array, view: Sequence | pa.Array) -> dict[str, int]:
    """How many rows have each field unknown (as the model will see them), and how many have any."""
    unknown = np.isnan(encode_arrow(pa.array(age), pa.array(sex, pa.string()), pa.array(view, pa.string())))
    return {**{f: int(unknown[:, i].sum()) for i, f in enumerate(FIELDS)}, "any": int(unknown.any(axis=1).sum())}


# --- user input (cxrflow predict) ----------------------------------------------------------------


def parse_age(text: Any, where: str = "--age") -> float | None:
    """A number of years, or None for an unknown word; anything else is a one-line error."""
    if text is None or str(text).strip().lower() in UNKNOWN_WORDS:
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise CxrflowError(f"{where}: age must be a number of years (or 'unknown'), got {str(text)!r}")
    return value


def parse_choice(text: Any, field: str, where: str) -> str | None:
    """``sex``: M/F/Male/Female; ``view``: PA/AP (any case); None for an unknown word; else an error."""
    if text is None or str(text).strip().lower() in UNKNOWN_WORDS:
        return None
    spellings = _SEX_SPELLINGS if field == "sex" else _VIEW_SPELLINGS
    value = str(text).strip()
    if value.upper() not in spellings:
        allowed = "M or F" if field == "sex" else "PA or AP"
        raise CxrflowError(f"{where}: {field} must be {allowed} (or 'unknown'), got {value!r}")
    return value


def read_metadata_csv(path: str | os.PathLike) -> dict[str, tuple[float | None, str | None, str | None]]:
    """``image,age,sex,view`` rows (header required) -> {image as written: (age, sex, view)}."""
    file = Path(path)
    if not file.is_file():
        raise CxrflowError("no such metadata CSV", file)
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        missing = [c for c in ("image", *FIELDS) if c not in header]
        if missing:
            raise CxrflowError(f"metadata CSV needs the columns image,age,sex,view; missing {', '.join(missing)}", file)
        reader.fieldnames = header
        out: dict[str, tuple[float | None, str | None, str | None]] = {}
        for row in reader:
            where = f"{file}:{reader.line_num}"
            image = (row["image"] or "").strip()
            if not image:
                raise CxrflowError(f"{where}: empty image name")
            out[image] = (
                parse_age(row["age"], where),
                parse_choice(row["sex"], "sex", where),
                parse_choice(row["view"], "view", where),
            )
    return out


# --- shortcuts (demographics alone predict a finding nearly as well as the model) --------------------

#: A finding is a shortcut when demographics alone clearly predict it and nearly as well as the model.
SHORTCUT_FLOOR = 0.6
SHORTCUT_MARGIN = 0.05
SHORTCUT_RULE = (
    f"demographics-only AUC lower bound > {SHORTCUT_FLOOR} and demographics-only AUC >= model AUC - {SHORTCUT_MARGIN}"
)


def shortcut_findings(
    names: Sequence[str], auc: dict[str, float | None], low: dict[str, float | None], model_auc: dict[str, float | None]
) -> list[str]:
    """The findings (in ``names`` order) that meet :data:`SHORTCUT_RULE`; a missing value never does."""
    out = []
    for n in names:
        a, lo, m = auc.get(n), low.get(n), model_auc.get(n)
        if a is not None and lo is not None and m is not None and lo > SHORTCUT_FLOOR and a >= m - SHORTCUT_MARGIN:
            out.append(n)
    return out


def rescored_baseline(
    baseline: dict[str, Any] | None, names: Sequence[str], model_auc: dict[str, float | None], source: str
) -> dict[str, Any]:
    """A member evaluation's ``demographics_only`` for a model scored on the same images (an ensemble):
    the same baseline, its shortcuts judged against ``model_auc``."""
    if not baseline or baseline.get("skipped"):
        return dict(
            baseline
            or {
                "skipped": "no member evaluation has a demographics-only baseline",
                "auc": {},
                "auc_low": {},
                "auc_high": {},
                "shortcut": [],
            }
        )
    shortcut = shortcut_findings(names, baseline.get("auc") or {}, baseline.get("auc_low") or {}, model_auc)
    return {**baseline, "shortcut": shortcut, "from": source}
