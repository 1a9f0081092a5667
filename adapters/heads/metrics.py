"""Classification metrics from predicted and true label ids (plain numpy, no sklearn needed)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np


def confusion_matrix(preds: Any, labels: Any, num_labels: int) -> np.ndarray:
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


def classification_metrics(preds: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over classes present in the labels or predictions)."""
    cm = confusion_matrix(preds, labels, num_labels)
    f1 = per_class_f1(cm)
    seen = (cm.sum(0) + cm.sum(1)) > 0
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "count": int(cm.sum()),
    }


def multilabel_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Micro-F1 (all label decisions pooled) and macro-F1 (mean over labels) of boolean matrices."""
    preds, labels = np.asarray(preds, bool), np.asarray(labels, bool)
    tp = (preds & labels).sum(0).astype(float)
    fp = (preds & ~labels).sum(0).astype(float)
    fn = (~preds & labels).sum(0).astype(float)
    denom = 2 * tp + fp + fn
    per_label = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    seen = denom > 0
    micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "micro_f1": float(2 * tp.sum() / micro_denom) if micro_denom else 0.0,
        "macro_f1": float(per_label[seen].mean()) if seen.any() else 0.0,
        "exact_match": float((preds == labels).all(1).mean()),
        "count": int(len(labels)),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties sharing their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MSE, and Pearson and Spearman correlations averaged over the outputs."""
    preds, labels = np.asarray(preds, float).reshape(len(preds), -1), np.asarray(labels, float).reshape(len(labels), -1)
    cols = range(preds.shape[1])
    return {
        "mse": float(((preds - labels) ** 2).mean()),
        "pearson": float(np.mean([_pearson(preds[:, j], labels[:, j]) for j in cols])),
        "spearman": float(np.mean([_pearson(_ranks(preds[:, j]), _ranks(labels[:, j])) for j in cols])),
        "count": int(len(labels)),
    }


def token_metrics(pred_tags: list[list[str]], true_tags: list[list[str]]) -> dict[str, float]:
    """Token accuracy; with ``seqeval`` installed also entity-level precision, recall and F1."""
    pairs = [(p, t) for ps, ts in zip(pred_tags, true_tags, strict=False) for p, t in zip(ps, ts, strict=False)]
    out = {"token_accuracy": sum(p == t for p, t in pairs) / max(len(pairs), 1), "count": len(true_tags)}
    try:
        from seqeval.metrics import f1_score, precision_score, recall_score
    except ImportError:
        return out
    out.update(
        entity_f1=float(f1_score(true_tags, pred_tags, zero_division=0)),
        entity_precision=float(precision_score(true_tags, pred_tags, zero_division=0)),
        entity_recall=float(recall_score(true_tags, pred_tags, zero_division=0)),
    )
    return out


def _words(text: str) -> list[str]:
    """Lower-cased words without punctuation, as SQuAD's answer normalization compares them."""
    import re
    import string

    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (ROUGE-L's core)."""
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def generation_metrics(generated: list[str], references: list[str]) -> dict[str, float]:
    """What a user of a generative task reads: exact match and token F1 (SQuAD's normalization: case,
    punctuation and articles ignored) and ROUGE-L F1 (longest common word subsequence), means over rows."""
    exact = f1 = rouge = 0.0
    for text, reference in zip(generated, references, strict=True):
        got, want = _words(text), _words(reference)
        exact += float(got == want)
        common = sum((Counter(got) & Counter(want)).values())
        if got and want and common:
            precision, recall = common / len(got), common / len(want)
            f1 += 2 * precision * recall / (precision + recall)
        elif not got and not want:
            f1 += 1.0
        lcs = _lcs(got, want)
        if got and want and lcs:
            rouge += 2 * lcs / (len(got) + len(want))
        elif not got and not want:
            rouge += 1.0
    n = max(len(references), 1)
    return {"exact_match": exact / n, "token_f1": f1 / n, "rougeL": rouge / n}
