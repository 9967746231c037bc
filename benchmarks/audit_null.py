"""How often the subgroup audit flags a gap where none was planted: its family-wise error rate.

Draws null studies (no subgroup gap: every finding separated equally well for every group; patients
with 4 images, sex and age per patient, view per image, as the audit tests' null studies), audits each
with :func:`cxrflow.results.audit.run_audit`, and prints the share of studies with any flag beside the
rate the simultaneous intervals promise (:data:`cxrflow.results.audit.FWER`, 5%), with a 95% binomial
interval, and how the gaps' z-scores (gap over its standard error) spread: standard normal when the
standard errors are right (sd 1, 5% beyond 1.96).

    python benchmarks/audit_null.py [--studies 150] [--n-boot 200]
"""

from __future__ import annotations

import argparse
import math
import time
from statistics import NormalDist

import numpy as np


def null_study(seed: int, n_patients: int = 1500, per_patient: int = 4, k: int = 4):
    """Labels, probabilities, patient ids, age, sex and view of a model without any subgroup gap."""
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    pid = np.repeat(np.arange(n_patients), per_patient)
    sex = np.where(rng.random(n_patients) < 0.5, "F", "M")[pid]
    age = rng.integers(5, 92, n_patients)[pid] + np.tile(np.arange(per_patient), n_patients)
    view = np.where(rng.random(n) < 0.6, "PA", "AP")
    labels = rng.random((n, k)) < 0.12
    scores = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 1.6 * labels - 2)))
    return labels, scores.astype(np.float32).astype(np.float64), pid, age, sex, view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=150)
    parser.add_argument("--n-boot", type=int, default=200)
    args = parser.parse_args()

    from cxrflow.results.audit import FWER, make_attributes, run_audit

    start = time.perf_counter()
    flagged, z = [], []
    for seed in range(1, args.studies + 1):
        labels, probs, pid, age, sex, view = null_study(seed)
        attributes, skipped = make_attributes(age, sex, view)
        rows = run_audit(labels, probs, pid, list("ABCD"), attributes, [0.3] * 4, n_boot=args.n_boot, seed=seed,
                         skipped=skipped)["rows"]  # fmt: skip
        tested = [r for r in rows if r["finding"] != "any" and not r["too_small"] and math.isfinite(r["gap_high"])]
        crit = NormalDist().inv_cdf(1 - (1 - tested[0]["gap_level"]) / 2)
        z += [r["gap"] / ((r["gap_high"] - r["gap"]) / crit) for r in tested]
        flagged.append(sum(r["flagged"] for r in tested))
    hits = sum(f > 0 for f in flagged)
    rate = hits / args.studies
    half = 1.96 * math.sqrt(max(rate * (1 - rate), 1e-12) / args.studies)
    z = np.array(z)
    print(f"{args.studies} null studies, {len(z) // args.studies} tests each, {args.n_boot} resamples "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    print(f"studies with any flag: {hits} ({100 * rate:.1f}%, 95% CI {100 * max(rate - half, 0):.1f}-"
          f"{100 * (rate + half):.1f}%); promised at most {100 * FWER:.0f}%; {sum(flagged)} flags in all")  # fmt: skip
    print(f"gap z-scores: mean {z.mean():+.3f}, sd {z.std():.3f} (1 when the standard errors are right), "
          f"beyond 1.96: {100 * np.mean(np.abs(z) > 1.96):.2f}% (5% expected)")  # fmt: skip


if __name__ == "__main__":
    main()
