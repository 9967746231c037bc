"""Cost of the subgroup audit against the evaluation's own patient bootstrap, measured in the same run.

Builds predictions the size of the NIH release's official test list (25,596 images of 2,797
patients, 14 findings; the real list's age, sex and view mix approximated), then times
:func:`cxrflow.results.evaluate.bootstrap_auc_ci` (the evaluation's bootstrap) and
:func:`cxrflow.results.audit.run_audit` (every finding, sex, age band, view and sex x age group, the
underdiagnosis rates) with the same number of resamples and the same seed. Target: audit <= 2 x
bootstrap. The audit's compiled pass is compiled (or loaded from numba's cache) before timing, and
that one-off cost is printed beside.

    python benchmarks/audit.py [--images 25596] [--patients 2797] [--n-boot 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def predictions(n_images: int, n_patients: int, k: int = 14, seed: int = 0):
    """Labels, probabilities, patient ids and (age, sex, view) of a model of middling skill."""
    rng = np.random.default_rng(seed)
    pid = np.sort(rng.integers(0, n_patients, n_images))
    sex = np.where(rng.random(n_patients) < 0.56, "M", "F")[pid]
    age = np.clip(rng.normal(48, 17, n_patients), 1, 94).astype(int)[pid]
    view = np.where(rng.random(n_images) < 0.4, "PA", "AP")
    prevalence = np.linspace(0.004, 0.2, k)
    labels = rng.random((n_images, k)) < prevalence
    scores = rng.normal(size=(n_images, k)) + 1.2 * labels
    probs = (1 / (1 + np.exp(-(scores - 2)))).astype(np.float32).astype(np.float64)  # float32 ties, as stored
    return labels, probs, pid, age, sex, view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=25_596)
    parser.add_argument("--patients", type=int, default=2_797)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()

    from cxrflow.results.audit import FindingPlan, group_and_rest_aucs, make_attributes, run_audit
    from cxrflow.results.evaluate import bootstrap_auc_ci

    labels, probs, pid, age, sex, view = predictions(args.images, args.patients)
    names = [f"finding_{j}" for j in range(labels.shape[1])]
    attributes, skipped = make_attributes(age, sex, view)
    start = time.perf_counter()
    plan = FindingPlan.build(labels[:, 0], probs[:, 0], np.arange(8), np.arange(8), attributes)
    group_and_rest_aucs(plan, np.ones((1, 8), np.int64), sum(len(a.groups) for a in attributes))
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    bootstrap_auc_ci(labels, probs, pid, n_boot=args.n_boot, seed=0)
    boot_s = time.perf_counter() - start
    thresholds = np.quantile(probs, 0.9, axis=0)
    start = time.perf_counter()
    result = run_audit(labels, probs, pid, names, attributes, thresholds, n_boot=args.n_boot, seed=0, skipped=skipped)
    audit_s = time.perf_counter() - start

    groups = sum(len(a.groups) for a in attributes)
    print(
        f"{args.images} images, {args.patients} patients, {len(names)} findings, {groups} groups, {args.n_boot} resamples"
    )
    print(f"evaluation bootstrap (baseline): {boot_s:8.2f} s")
    print(f"subgroup audit:                  {audit_s:8.2f} s   ratio {audit_s / boot_s:.2f} (target <= 2)")
    print(f"audit's compiled pass, compile or cache load (once per process): {compile_s:.2f} s")
    print(
        f"tests {result['summary']['gaps']['tests']}, flagged {result['summary']['gaps']['flagged']} (no gap planted)"
    )


if __name__ == "__main__":
    main()
