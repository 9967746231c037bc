import math

import numpy as np
from sklearn.metrics import roc_auc_score

from cxrflow.metrics import binary_auc, mean_auc, per_class_auc


def test_hand_computed_auc():
    # positives 0.8, 0.4 ; negatives 0.6, 0.2 -> pairs won: (0.8>0.6,0.8>0.2,0.4>0.2) = 3 of 4
    assert binary_auc([1, 1, 0, 0], [0.8, 0.4, 0.6, 0.2]) == 0.75


def test_ties_count_half():
    assert binary_auc([1, 0], [0.5, 0.5]) == 0.5


def test_single_class_is_nan_and_left_out_of_mean():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    s = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3], [0.2, 0.4]])
    aucs = per_class_auc(y, s)
    assert aucs[0] == 1.0 and math.isnan(aucs[1])
    assert mean_auc(aucs) == 1.0


def test_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 3))
    s = rng.random((200, 3)).round(2)  # ties
    for k in range(3):
        assert abs(binary_auc(y[:, k], s[:, k]) - roc_auc_score(y[:, k], s[:, k])) < 1e-12
