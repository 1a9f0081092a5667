"""Rows -> batches: padding on the tokenizer's side, labels padded with IGNORE, windows and choices."""

import torch

from adapters.data.encoding import IGNORE, Collator
from adapters.heads import Classification, MultipleChoice, TokenClassification


class _Tokenizer:
    pad_token_id = 0

    def __init__(self, side: str):
        self.padding_side = side


def test_padding_follows_the_tokenizers_side():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [8], "attention_mask": [1], "labels": 0},
    ]
    right = Collator(_Tokenizer("right"))(rows)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and right["labels"].tolist() == [1, 0]
    left = Collator(_Tokenizer("left"))(rows)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"].tolist() == [
        [1, 1, 1],
        [0, 0, 1],
    ]


def test_per_token_labels_are_padded_with_ignore_on_the_same_side():
    rows = [
        {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [2, IGNORE]},
        {"input_ids": [7], "attention_mask": [1], "labels": [1]},
    ]
    batch = Collator(_Tokenizer("left"), TokenClassification(labels=["O", "B", "I"]))(rows)
    assert batch["labels"].tolist() == [[2, IGNORE], [IGNORE, 1]]


def test_multiple_choice_rows_become_batch_by_choice_by_length():
    rows = [
        {"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1]], "labels": 0},
        {"input_ids": [[4], [5, 6, 7]], "attention_mask": [[1], [1, 1, 1]], "labels": 1},
    ]
    batch = Collator(_Tokenizer("right"), MultipleChoice(num_choices=2))(rows)
    assert batch["input_ids"].shape == (2, 2, 3)
    assert batch["input_ids"][1, 1].tolist() == [5, 6, 7] and batch["attention_mask"][0, 1].tolist() == [1, 0, 0]


def test_windows_are_flattened_with_their_text_index():
    rows = [
        {"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1]], "labels": 1},
        {"input_ids": [[4]], "attention_mask": [[1]], "labels": 0},
    ]
    batch = Collator(_Tokenizer("right"), Classification(labels=["a", "b"], long_text="windows"))(rows)
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0], [4, 0]]
    assert batch["window_doc"].tolist() == [0, 0, 1] and torch.equal(batch["labels"], torch.tensor([1, 0]))
