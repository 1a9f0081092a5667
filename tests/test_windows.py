"""Long texts read as overlapping windows: coverage, pooled logits, and the train/predict paths."""

import pytest
import torch

import adapters
from adapters.data.encoding import encode_rows

from .helpers import long_rows, rows_of


def _windowed(path, **kwargs):
    head = adapters.Classification(labels=["neg", "pos"], long_text="windows", window_overlap=4, **kwargs)
    return adapters.adapt(path, adapter=adapters.LoRA(r=4), head=head, max_length=16)


def test_windows_cover_the_whole_text(tiny_llama, tiny_bert):
    text = long_rows(1, filler=45)[0]["text"]
    model = _windowed(tiny_llama)
    windows = encode_rows([{"text": text}], model.tokenizer, model.head_spec, "text", None, 16, "data")[0]["input_ids"][
        0
    ]
    full = model.tokenizer(text)["input_ids"]
    assert len(windows) == 4 and all(len(w) <= 16 for w in windows)
    rebuilt = windows[0] + [t for w in windows[1:] for t in w[4:]]  # consecutive windows share 4 tokens
    assert rebuilt == full
    bert = _windowed(tiny_bert)
    windows = encode_rows([{"text": text}], bert.tokenizer, bert.head_spec, "text", None, 16, "data")[0]["input_ids"][0]
    content = bert.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(w[0] == bert.tokenizer.cls_token_id and w[-1] == bert.tokenizer.sep_token_id for w in windows)
    assert windows[0][1:-1] + [t for w in windows[1:] for t in w[1:-1][4:]] == content


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_text_logits_pool_the_window_logits(tiny_llama, pooling):
    model = _windowed(tiny_llama, window_pooling=pooling)
    text = long_rows(1, filler=40)[0]["text"]
    pooled = model.logits([text, "good film"])
    windows = encode_rows([{"text": text}], model.tokenizer, model.head_spec, "text", None, 16, "data")[0]["input_ids"][
        0
    ]
    model.eval()
    with torch.no_grad():
        each = torch.cat(
            [
                model(input_ids=torch.tensor([w]), attention_mask=torch.ones(1, len(w), dtype=torch.long))["logits"]
                for w in windows
            ]
        )
    expected = each.mean(0) if pooling == "mean" else each.max(0).values
    assert torch.allclose(pooled[0], expected, atol=1e-5)
    short = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]), max_length=16
    )
    assert torch.allclose(pooled[1], short.logits(["good film"])[0], atol=1e-5)  # one window = plain truncation


def test_training_reads_past_the_first_window(tiny_llama, tmp_path):
    train_rows, eval_rows = long_rows(96), long_rows(32, seed=1)
    config = adapters.TrainConfig(epochs=8, lr=5e-3, head_lr=5e-2, batch_size=8, progress=False)
    truncated = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=8), head=adapters.Classification(labels=["neg", "pos"]), max_length=16
    )
    blind = adapters.train(truncated, train_rows, eval_rows, config)
    windowed = _windowed(tiny_llama)
    seen = adapters.train(windowed, train_rows, eval_rows, config)
    assert blind["train_truncated_rows"] == 96 and "train_truncated_rows" not in seen
    assert blind["eval_accuracy"] <= 0.65 < 0.85 <= seen["eval_accuracy"]  # the answer is in the last window
    windowed.save_pretrained(tmp_path / "art")
    again = adapters.load(tmp_path / "art")
    texts = [r["text"] for r in eval_rows[:6]]
    assert torch.allclose(again.logits(texts), windowed.logits(texts), atol=1e-5)
    assert again.predict(texts) == windowed.predict(texts)


def test_window_settings_are_checked(tiny_llama):
    with pytest.raises(adapters.ConfigError, match="long_text"):
        adapters.Classification(labels=["a", "b"], long_text="chunks")
    with pytest.raises(adapters.ConfigError, match="window_pooling"):
        adapters.Regression(long_text="windows", window_pooling="median")
    model = adapters.adapt(
        tiny_llama,
        adapter=None,
        head=adapters.Classification(labels=["a", "b"], long_text="windows", window_overlap=20),
        max_length=16,
    )
    with pytest.raises(adapters.DataError, match="window_overlap"):
        model.predict("good film")


def test_windows_in_groups_give_the_same_logits_and_gradients(tiny_llama):
    """window_batch bounds memory (groups, checkpointed in training) without changing the result."""
    from adapters.data.encoding import Collator

    rows = long_rows(3, filler=60)  # 5 windows each: 15 windows in the batch, groups of 4
    results = []
    for window_batch in (1000, 4):
        # no dropout: one draw over 15 windows and four draws over groups give different masks
        head = adapters.Classification(
            labels=["neg", "pos"], long_text="windows", window_overlap=4, window_batch=window_batch, dropout=0.0
        )
        model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4, dropout=0.0), head=head, max_length=16)
        columns, _ = encode_rows(rows, model.tokenizer, head, "text", "label", 16, "data")
        batch = Collator(model.tokenizer, head)(rows_of(columns))
        assert batch["input_ids"].shape[0] == 15  # more windows than one group holds
        model.train()
        out = model(**batch)
        out["loss"].backward()
        grads = [p.grad.clone() for p in model.trainable_parameters()]
        results.append((out["logits"].detach(), out["loss"].item(), grads))
        results[-1] += (model.logits([r["text"] for r in rows]),)
    (a_logits, a_loss, a_grads, a_eval), (b_logits, b_loss, b_grads, b_eval) = results
    assert torch.allclose(a_logits, b_logits, atol=1e-5) and a_loss == pytest.approx(b_loss, abs=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a_grads, b_grads, strict=False))
    assert torch.allclose(a_eval, b_eval, atol=1e-5)
    with pytest.raises(adapters.ConfigError, match="window_batch"):
        adapters.Classification(labels=["a", "b"], long_text="windows", window_batch=0)
