"""Batching levers: length-grouped order, packing, length-sorted inference. Each must compute what
plain padded batches compute: same rows once per epoch, same logits, same order back to the caller."""

import random

import pytest
import torch

import adapters
from adapters.data.batching import LengthGroupedSampler, balanced_rows, pack, packing_pays
from adapters.data.encoding import Collator, encode_rows
from adapters.heads import pool, pool_segments

from .helpers import rows_of, toy_sentiment


def _lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(3, 64) for _ in range(n)]


@pytest.mark.parametrize("n,batch", [(100, 16), (96, 16), (7, 16), (1000, 8)])
def test_grouped_order_covers_every_row_once_and_is_seeded(n, batch):
    lengths = _lengths(n)
    sampler = LengthGroupedSampler(lengths, batch, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(n))
    assert list(LengthGroupedSampler(lengths, batch, seed=3)) == first  # another process: the same order
    sampler.set_epoch(1)
    assert list(sampler) != first or n < 2 * batch  # a new epoch, a new order
    assert sorted(sampler) == list(range(n))
    assert list(LengthGroupedSampler(lengths, batch, seed=4)) != first or n < 2 * batch


def test_grouped_batches_pad_far_less_and_start_with_the_longest():
    lengths = _lengths(1600)
    sampler = LengthGroupedSampler(lengths, 16, seed=0)
    order = list(sampler)
    batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    assert batches == sampler.batches()  # the loader's cut matches the sampler's batches: a short one is last

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    shuffled = list(range(1600))
    random.Random(0).shuffle(shuffled)
    plain = [shuffled[i : i + 16] for i in range(0, 1600, 16)]
    real = sum(lengths)
    assert padded(batches) / real < 1.1 < 1.5 < padded(plain) / real
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    assert len(batches[-1]) == 16


def test_pack_positions_segments_and_row_bound():
    sequences = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    one = pack(sequences, pad_id=0)
    assert one["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert one["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1, 2, 3]]
    assert one["segments"].tolist() == [[0, 0, 0, 1, 2, 2, 3, 3, 3, 3]]
    even = pack(sequences, pad_id=0, row_tokens=5)  # 10 tokens in 2 rows of 5: balanced, no filler
    assert even["input_ids"].tolist() == [[8, 11, 12, 13, 14], [5, 6, 7, 9, 10]]
    assert even["segments"].tolist() == [[1, 3, 3, 3, 3], [0, 0, 0, 2, 2]]
    rows = pack(sequences, pad_id=0, row_tokens=4)
    assert rows["input_ids"].tolist() == [[11, 12, 13, 14], [5, 6, 7, 0], [8, 9, 10, 0]]
    assert rows["segments"].tolist() == [[3, 3, 3, 3], [0, 0, 0, -1], [1, 2, 2, -1]]
    assert rows["position_ids"][2].tolist() == [0, 0, 1, 0]  # filler restarts: a segment of its own
    long = pack([[1] * 6, [2]], pad_id=0, row_tokens=4)  # longer than a row: a row of its own
    assert long["segments"].tolist() == [[0] * 6, [1, -1, -1, -1, -1, -1]]
    many = pack([[1] * 4] * 9, pad_id=0)  # by default rows of three of the longest: 36 tokens in 3 rows of 12
    assert many["input_ids"].shape == (3, 12) and int((many["segments"] == -1).sum()) == 0


def test_packed_rows_come_out_of_similar_length():
    lengths = [100, 90, 80, 70, 60, 60, 50, 40, 40, 30, 20, 10] * 2
    rows = balanced_rows(lengths, row_tokens=1024)
    sizes = [sum(lengths[i] for i in row) for row in rows]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every sequence once
    assert len(rows) == 2 and max(sizes) <= 1024 and max(sizes) - min(sizes) <= 10


def test_batches_are_packed_only_where_padding_would_cost_much(tiny_llama):
    assert packing_pays([10, 40, 12, 9])  # padded: 160 tokens for 71 real ones
    assert not packing_pays([256, 256, 250, 256])  # little padding: packing's quadratic attention costs more
    # the same share of padding (15%) pays to remove from short rows, not from long ones, whose packed
    # rows' attention would cost more than the padding's linear layers
    assert packing_pays([32] * 8 + [27] * 8)
    assert not packing_pays([512] * 8 + [430] * 8)
    head = adapters.Classification(labels=["neg", "pos"])
    model = adapters.adapt(tiny_llama, adapter=None, head=head, quantization=None)
    collate = Collator(model.tokenizer, head, pack=True)
    even = collate([{"input_ids": [5] * 20, "attention_mask": [1] * 20, "labels": 0}] * 4)
    mixed = collate([{"input_ids": [5] * n, "attention_mask": [1] * n, "labels": 0} for n in (20, 3, 4, 2)])
    assert "attention_mask" in even and "segments" not in even
    assert "segments" in mixed and mixed["input_ids"].numel() == 29
    empty = collate([{"input_ids": [5] * n, "attention_mask": [1] * n, "labels": 0} for n in (20, 3, 0, 2)])
    assert "segments" not in empty  # an empty text has no segment to pool: padded


@pytest.mark.parametrize("method", ["last", "first", "mean"])
def test_segment_pooling_equals_padded_pooling(method):
    torch.manual_seed(0)
    lengths = [3, 1, 4]
    padded = torch.randn(3, 4, 5)
    mask = torch.tensor([[1 if j < n else 0 for j in range(4)] for n in lengths])
    packed = torch.cat([padded[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)
    segments = torch.tensor([[i for i, n in enumerate(lengths) for _ in range(n)]])
    assert torch.allclose(pool(padded, mask, method), pool_segments(packed, segments, method))


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("quantization", ["nf4", None])
def test_packed_logits_and_gradients_equal_padded(tiny_llama, pooling, quantization):
    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4, dropout=0.0),
        head=adapters.Classification(labels=["neg", "pos"], pooling=pooling, dropout=0.0),
        quantization=quantization,
    )
    with torch.no_grad():  # move lora_B off zero, so the adapter takes part
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    columns, _ = encode_rows(toy_sentiment(12), model.tokenizer, model.head_spec, "text", "label", 64, "rows")
    rows = rows_of(columns)
    results = []
    for batch in (
        Collator(model.tokenizer, model.head_spec)(rows),
        Collator(model.tokenizer, model.head_spec, pack=True)(rows),
        {
            **pack([r["input_ids"] for r in rows], model.tokenizer.pad_token_id, row_tokens=16),
            "labels": torch.tensor([r["labels"] for r in rows]),
        },
    ):
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out["loss"].backward()
        results.append(
            (out["logits"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        )
    (padded, grads), *packed = results
    for logits, packed_grads in packed:
        assert torch.allclose(logits, padded, atol=1e-5)
        for name in grads:
            assert torch.allclose(packed_grads[name], grads[name], atol=1e-5), name


def test_training_packs_decoders_and_groups_encoders(tiny_llama, tiny_bert, toy_data):
    head = adapters.Classification(labels=["neg", "pos"])
    decoder = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=head)
    metrics = adapters.train(
        decoder, toy_data[0], None, adapters.TrainConfig(max_steps=3, batch_size=8, progress=False)
    )
    assert metrics["train_real_token_fraction"] > 0.95  # packed: only the filler that evens the rows is not real
    encoder = adapters.adapt(tiny_bert, adapter=adapters.LoRA(r=4), head=head)
    grouped = adapters.train(
        encoder, toy_data[0], None, adapters.TrainConfig(max_steps=3, batch_size=8, progress=False)
    )
    plain = adapters.train(
        encoder,
        toy_data[0],
        None,
        adapters.TrainConfig(max_steps=3, batch_size=8, progress=False, group_by_length=False),
    )
    assert grouped["train_real_token_fraction"] > plain["train_real_token_fraction"]
    with pytest.raises(adapters.ConfigError, match="packing=True needs a decoder"):
        adapters.train(encoder, toy_data[0], None, adapters.TrainConfig(max_steps=1, packing=True, progress=False))


def test_inference_sorted_by_length_returns_the_callers_order(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    texts = [r["text"] for r in toy_sentiment(30, seed=2)]
    together = model.logits(texts, batch_size=8)
    one_by_one = torch.cat([model.logits([t]) for t in texts])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert model.predict(texts[::-1], batch_size=4) == model.predict(texts, batch_size=64)[::-1]


def test_inference_packs_where_it_pays_and_returns_what_padding_returns(tiny_llama, monkeypatch):
    import sys

    import adapters.data.encoding as encoding

    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    texts = [r["text"] for r in toy_sentiment(40, seed=3)]
    packed_batches = []
    monkeypatch.setattr(encoding, "pack", lambda *a, **k: packed_batches.append(1) or pack(*a, **k))
    packed = model.logits(texts, batch_size=8)
    evaluated = adapters.evaluate(model, toy_sentiment(40, seed=3), batch_size=8)
    assert packed_batches  # the length-sorted batches still held enough padding to pack
    monkeypatch.setattr(sys.modules["adapters.model"], "packable", lambda head, decoder: False)
    monkeypatch.setattr(sys.modules["adapters.training.loaders"], "packable", lambda head, decoder: False)
    assert torch.allclose(packed, model.logits(texts, batch_size=8), atol=1e-5)
    padded = adapters.evaluate(model, toy_sentiment(40, seed=3), batch_size=8)
    assert evaluated["eval_accuracy"] == padded["eval_accuracy"]
    assert evaluated["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)
