"""Classification metrics from predicted and true label ids (plain numpy, no sklearn needed)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(preds, labels, num_labels: int) -> np.ndarray:
    """``cm[true, predicted]`` counts."""
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(float)
    precision_den = cm.sum(0)
    recall_den = cm.sum(1)
    denom = precision_den + recall_den
    # F1 = 2TP / (2TP + FP + FN); a class never predicted nor present scores 0
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def classification_metrics(preds, labels, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over classes present in the labels or predictions)."""
    cm = confusion_matrix(preds, labels, num_labels)
    f1 = per_class_f1(cm)
    seen = (cm.sum(0) + cm.sum(1)) > 0
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "count": int(cm.sum()),
    }
