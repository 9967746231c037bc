"""The patient bootstrap's resamples: one source for the evaluation's intervals and the subgroup audit.

Each resample draws as many patients as there are, with replacement, and keeps all images of every
drawn patient as many times as the patient is drawn; images of one patient are not independent, so
resampling images would give intervals that are too narrow.
"""

from __future__ import annotations

import numpy as np

#: Bootstrap replicates are drawn in chunks holding about this many weights at once.
CHUNK_WEIGHTS = 8_000_000


def patient_resamples(patient_ids: np.ndarray, n_boot: int, seed: int):
    """(patient index of each image ``[N]``, iterator of ``(first resample, counts[b, P])``): how often
    each of the P patients is drawn in each of ``n_boot`` resamples, in chunks of about
    :data:`CHUNK_WEIGHTS` image weights. The evaluation's intervals
    (:func:`cxrflow.results.evaluate.bootstrap_aucs`) and the subgroup audit use exactly these."""
    _, patient_of_image = np.unique(np.asarray(patient_ids), return_inverse=True)
    patient_of_image = patient_of_image.ravel()
    n = patient_of_image.size
    n_patients = int(patient_of_image.max()) + 1 if n else 0
    chunk = max(1, min(n_boot, CHUNK_WEIGHTS // max(n, n_patients, 1)))

    def chunks():
        rng = np.random.default_rng(seed)
        for start in range(0, n_boot, chunk):
            b = min(chunk, n_boot - start)
            draws = rng.integers(0, n_patients, size=(b, n_patients))
            flat = (draws + np.arange(b)[:, None] * n_patients).ravel()
            yield start, np.bincount(flat, minlength=b * n_patients).reshape(b, n_patients)

    return patient_of_image, chunks()
