import numpy as np

from adapters.metrics import classification_metrics, confusion_matrix, per_class_f1


def test_metrics_on_a_known_case():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    cm = confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    f1 = per_class_f1(cm)
    assert np.allclose(f1, [0.8, 0.5, 2 / 3])
    m = classification_metrics(preds, labels, 3)
    assert m["accuracy"] == 4 / 6 and np.isclose(m["macro_f1"], np.mean([0.8, 0.5, 2 / 3])) and m["count"] == 6
