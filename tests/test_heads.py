"""Pooling and the classification head spec."""

import pytest
import torch

import adapters
from adapters.heads import pool
from adapters.registry import head_from_dict


def test_pooling_is_the_same_with_left_and_right_padding():
    torch.manual_seed(0)
    real = torch.randn(1, 3, 4)  # three real tokens
    pad = torch.zeros(1, 2, 4)
    right, left = torch.cat([real, pad], 1), torch.cat([pad, real], 1)
    mask_right, mask_left = torch.tensor([[1, 1, 1, 0, 0]]), torch.tensor([[0, 0, 1, 1, 1]])
    for method, expected in [("last", real[:, -1]), ("first", real[:, 0]), ("mean", real.mean(1))]:
        assert torch.allclose(pool(right, mask_right, method), expected)
        assert torch.allclose(pool(left, mask_left, method), expected)


def test_auto_pooling_fits_the_base():
    spec = adapters.Classification(labels=["a", "b"])
    assert spec.resolved_pooling(is_decoder=True) == "last"
    assert spec.resolved_pooling(is_decoder=False) == "mean"


def test_label_ids_from_names_and_ints():
    spec = adapters.Classification(labels=["neg", "pos"])
    assert spec.label_id("pos") == 1 and spec.label_id(0) == 0
    with pytest.raises(adapters.DataError, match="not one of"):
        spec.label_id("neutral")
    with pytest.raises(adapters.DataError, match="out of range"):
        spec.label_id(2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"labels": ["only"]},
        {"labels": ["a", "a"]},
        {"labels": "ab"},
        {"labels": ["a", "b"], "pooling": "max"},
        {"labels": ["a", "b"], "class_weights": [1.0]},
        {"labels": ["a", "b"], "label_smoothing": 1.5},
    ],
)
def test_bad_head_specs(kwargs):
    with pytest.raises(adapters.ConfigError):
        adapters.Classification(**kwargs)


def test_class_weights_and_label_smoothing_change_the_loss():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    plain = adapters.Classification(labels=["a", "b"]).loss(logits, labels)
    weighted = adapters.Classification(labels=["a", "b"], class_weights=[1.0, 5.0]).loss(logits, labels)
    smoothed = adapters.Classification(labels=["a", "b"], label_smoothing=0.2).loss(logits, labels)
    assert torch.isclose(weighted, plain)  # only class 0 present: its weight normalises away
    assert not torch.isclose(smoothed, plain)
    mixed = torch.tensor([0, 1])
    assert not torch.isclose(
        adapters.Classification(labels=["a", "b"], class_weights=[1.0, 5.0]).loss(logits, mixed),
        adapters.Classification(labels=["a", "b"]).loss(logits, mixed),
    )


def test_spec_round_trips_through_dict():
    spec = adapters.Classification(labels=["x", "y", "z"], pooling="first", class_weights=[1, 2, 3])
    assert head_from_dict(spec.to_dict()) == spec
