"""``qadapters predict`` and ``eval`` on files, as a user runs them: CSV, JSONL and Parquet inputs; every
problem with the input found before the model loads; an output written whole or not at all; rows named
by their file's own 1-based lines."""

from __future__ import annotations

import json
import re

import pytest

import adapters
from adapters.cli import main as cli

from .helpers import toy_sentiment


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["neg", "pos"]))
    path = tmp_path_factory.mktemp("predict") / "art"
    model.save_pretrained(path)
    return path


def _run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _no_model_load(monkeypatch):
    """Fail the test if a model loads: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(adapters, "load", refuse)


def test_predict_reads_csv_jsonl_and_parquet_alike(artifact, tmp_path, capsys):
    import pandas as pd

    rows = [{"text": r["text"], "id": i} for i, r in enumerate(toy_sentiment(9))]
    expected = adapters.load(artifact).predict([r["text"] for r in rows])
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "in.csv", index=False)
    frame.to_parquet(tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("in.csv", "in.jsonl", "in.parquet"):
        out = tmp_path / f"{name}.out.jsonl"
        code, _, err = _run(capsys, "predict", artifact, "--input", tmp_path / name, "--output", out)
        assert code == 0, err
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in got] == list(range(9)) and [r["prediction"] for r in got] == expected, name


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "empty.csv is empty"),
        ("header.csv", "text\n", r"has a header \(text\) but no rows"),
        ("blank.jsonl", "\n\n", "blank.jsonl holds no rows"),
        ("hole.csv", "text,id\ngood fun,1\n,2\n", "hole.csv line 3: column 'text' is empty"),
        ("space.jsonl", '{"text": "good"}\n\n{"text": "   "}\n', "space.jsonl line 3: column 'text' is empty"),
        ("other.csv", "review\ngood\n", "has no 'text' field .*--text-column"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(artifact, tmp_path, capsys, monkeypatch, name, content, message):
    (tmp_path / name).write_text(content)
    _no_model_load(monkeypatch)
    code, _, err = _run(capsys, "predict", artifact, "--input", tmp_path / name, "--output", tmp_path / "o.jsonl")
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "o.jsonl").exists() and not list(tmp_path.glob(".o.jsonl*"))


def test_a_failed_run_leaves_no_output_file(artifact, tmp_path, capsys, monkeypatch):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in toy_sentiment(40)))
    calls = []
    real = adapters.AdaptedModel.predict

    def fail_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(adapters.AdaptedModel, "predict", fail_second)
    with pytest.raises(RuntimeError, match="disk full"):
        cli(
            [
                "predict",
                str(artifact),
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "o.jsonl"),
                "--batch-size",
                "16",
            ]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # neither the output nor a partial file


def test_eval_checks_labels_before_the_model_loads(artifact, tmp_path, capsys, monkeypatch):
    (tmp_path / "held.csv").write_text("text,label\ngood fun,pos\na dull mess,neutral\n")
    _no_model_load(monkeypatch)
    code, _, err = _run(capsys, "eval", artifact, "--data", tmp_path / "held.csv")
    assert code == 2 and "held.csv line 3: label 'neutral' is not one of" in err


def test_generation_flags_are_refused_for_a_classifier_before_loading(artifact, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    code, _, err = _run(capsys, "predict", artifact, "some text", "--max-new-tokens", "5")
    assert code == 2 and "--max-new-tokens: generation settings" in err and "classification" in err


def test_training_rows_from_a_file_are_named_by_line(tiny_llama, tmp_path):
    from adapters.data.sources import group_split, load_rows

    (tmp_path / "train.csv").write_text("text,label,group\n" + "good fun,pos,a\n" * 5 + "  ,neg,b\n" + "dull,neg,c\n")
    rows = load_rows(str(tmp_path / "train.csv"))
    train, _ = group_split(rows, "group", 0.0, seed=0)  # a split keeps where each row came from
    model = adapters.adapt(tiny_llama, adapter=None, head=adapters.Classification(labels=["neg", "pos"]))
    with pytest.raises(adapters.DataError, match=r"train.csv line 7: column 'text' is empty"):
        adapters.train(model, train, None, adapters.TrainConfig(max_steps=1, progress=False))
