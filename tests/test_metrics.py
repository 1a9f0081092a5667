import numpy as np
import pytest

from adapters.heads.metrics import classification_metrics, confusion_matrix, per_class_f1


def test_metrics_on_a_known_case():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    cm = confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    f1 = per_class_f1(cm)
    assert np.allclose(f1, [0.8, 0.5, 2 / 3])
    m = classification_metrics(preds, labels, 3)
    assert m["accuracy"] == 4 / 6 and np.isclose(m["macro_f1"], np.mean([0.8, 0.5, 2 / 3])) and m["count"] == 6


def test_spearman_gives_ties_their_average_rank():
    from adapters.heads.metrics import _ranks, regression_metrics

    assert _ranks(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [1.0, 2.5, 2.5, 0.0]
    # scipy.stats.spearmanr([1, 2, 2, 3], [1, 2, 3, 4]) = 0.9486832980505138
    out = regression_metrics(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert out["spearman"] == pytest.approx(0.9486832980505138) and out["count"] == 4
    assert out["mse"] == pytest.approx((0 + 0 + 1 + 1) / 4)
