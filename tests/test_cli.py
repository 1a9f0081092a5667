"""The command line driven as a user would: subprocesses, YAML files, exit codes."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

import adapters
from adapters.config.run_file import load_run_config

from .helpers import toy_sentiment

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def in_process(capsys, *args, expect: int = 0):
    """The command run in this process (``cli.main``): its exit code checked, its captured output returned."""
    from adapters.cli import main

    capsys.readouterr()  # what the test printed before is not the command's
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == expect, out.out[-2000:] + out.err[-3000:]
    return out


def qadapters(*args, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "adapters", *map(str, args)], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert done.returncode == expect, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def config_file(tiny_llama, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", toy_sentiment(64))
    config = {
        "model": {"name": tiny_llama, "quantization": "nf4"},
        "adapter": {"kind": "lora", "r": 4},
        "head": {"kind": "classification", "labels": ["neg", "pos"]},
        "data": {"train": str(data), "eval_fraction": 0.25, "seed": 1},
        "train": {"epochs": 3, "lr": 5e-3, "batch_size": 8, "progress": False},
        "output": str(tmp_path / "art"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_eval_predict_info(config_file, tmp_path, capsys):
    done = qadapters("train", config_file, "train.lr=1e-2", "adapter.r=8")  # the installed command, end to end
    assert '"eval_accuracy"' in done.stdout and "artifact saved" in done.stdout
    art = tmp_path / "art"
    saved = yaml.safe_load((art / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-2 and saved["adapter"]["r"] == 8  # overrides applied
    assert "# art" in (art / "README.md").read_text() and "LoRA" in (art / "README.md").read_text()

    metrics = json.loads(in_process(capsys, "eval", art, "--data", tmp_path / "train.jsonl").out)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    in_python = adapters.evaluate(adapters.load(art), rows)  # the command computes what the API computes
    assert metrics["eval_count"] == 64 and metrics["eval_accuracy"] == pytest.approx(in_python["eval_accuracy"])
    assert metrics["eval_loss"] == pytest.approx(in_python["eval_loss"], rel=1e-5)

    lines = in_process(capsys, "predict", art, "good fun film", "bad dull mess").out.splitlines()
    assert [json.loads(x)["input"] for x in lines] == ["good fun film", "bad dull mess"]
    inputs = _write_jsonl(
        tmp_path / "in.jsonl", [{"text": r["text"], "id": i} for i, r in enumerate(toy_sentiment(70))]
    )
    in_process(capsys, "predict", art, "--input", inputs, "--output", tmp_path / "out.jsonl", "--batch-size", "16")
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == list(range(70)) and all(r["prediction"] in ("neg", "pos") for r in out)
    assert out[0]["prediction"] == adapters.load(art).predict(out[0]["text"])

    info = in_process(capsys, "info", art).out
    assert "nf4" in info and '"labels": ["neg", "pos"]' in info and "eval_accuracy" in info


def test_merged_model_predicts_like_the_adapter(config_file, tmp_path, capsys):
    from transformers import AutoModel

    in_process(capsys, "train", config_file)
    done = in_process(capsys, "merge", tmp_path / "art", tmp_path / "merged")
    assert "dequantizing the nf4 base" in done.out
    texts = [r["text"] for r in toy_sentiment(12, seed=3)]
    adapted, merged = adapters.load(tmp_path / "art"), adapters.load(tmp_path / "merged")
    assert merged.base.quantization is None and merged.adapter is None
    assert torch.allclose(adapted.logits(texts), merged.logits(texts), atol=1e-4)  # float rounding only
    assert merged.predict(texts) == adapted.predict(texts)
    plain = AutoModel.from_pretrained(tmp_path / "merged")  # a standalone transformers folder
    assert not any("lora" in n for n, _ in plain.named_parameters())


def test_bottleneck_cannot_be_merged(tiny_llama, tmp_path, capsys):
    model = adapters.adapt(tiny_llama, adapter=adapters.Bottleneck(), head=adapters.Classification(labels=["a", "b"]))
    model.save_pretrained(tmp_path / "art")
    err = in_process(capsys, "merge", tmp_path / "art", tmp_path / "merged", expect=2).err
    assert err.startswith("error:") and "no weight matrix can absorb" in err and not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c["train"].update(lrr=1e-3), "unknown key train.lrr; allowed keys of train"),
        (lambda c: c["train"].update(epochs="three"), "train.epochs='three' has the wrong type"),
        (lambda c: c["adapter"].update(kind="prefix"), "adapter.kind='prefix' must be one of"),
        (lambda c: c.update(optimiser={}), "unknown section 'optimiser'"),
        (lambda c: c["data"].update(train="missing.csv"), "data file missing.csv does not exist"),
        (lambda c: c["adapter"].update(r=0), "adapter: LoRA r=0"),
    ],
)
def test_config_errors_name_the_key(config_file, edit, match, capsys):
    config = yaml.safe_load(config_file.read_text())
    edit(config)
    config_file.write_text(yaml.safe_dump(config))
    err = in_process(capsys, "train", config_file, expect=2).err
    assert match in err and err.startswith("error:")


def test_bad_yaml_and_bad_override(config_file, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in in_process(capsys, "train", bad, expect=2).err
    assert "section.key=value" in in_process(capsys, "train", config_file, "train.lr", expect=2).err


def test_a_config_error_exits_with_code_2(config_file):
    """The one subprocess of the error cases: the real exit code and stderr of the installed command."""
    config = yaml.safe_load(config_file.read_text())
    config["train"]["lrr"] = 1e-3
    config_file.write_text(yaml.safe_dump(config))
    done = qadapters("train", config_file, expect=2)
    assert done.stderr.startswith("error: unknown key train.lrr") and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["train", "eval", "predict", "merge", "info", "serve", "export"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        in_process(capsys, command, "--help")
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "example:" in out and f"qadapters {command}" in out


def test_recipe_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        text = path.read_text()
        assert text.startswith("#") and f"train recipes/configs/{path.name}" in text  # a header saying how to run it
        load_run_config(path)


def test_estimate_and_estimate_only(config_file, tmp_path, capsys):
    done = in_process(
        capsys,
        "estimate",
        config_file,
        "train.batch_size=4",
        "model.max_length=32",
        "--device",
        "cuda",
        "--processes",
        "2",
        "--json",
    )
    data = json.loads(done.out)
    assert (
        data["settings"]["batch_size"] == 4 and data["settings"]["seq_len"] == 32 and data["settings"]["processes"] == 2
    )
    assert data["framework"] > 0 and data["total"] > data["tensors"] > data["activations"] > 0
    done = in_process(capsys, "train", config_file, "--estimate-only")
    assert "activations" in done.out and "total" in done.out
    assert not (tmp_path / "art").exists()  # nothing trained, nothing written
    in_process(capsys, "estimate", config_file, "train.batch_size=0", expect=2)


def test_eval_reads_the_columns_the_artifact_was_trained_on(tiny_llama, tmp_path, capsys):
    rows = [{"review": r["text"], "sentiment": r["label"]} for r in toy_sentiment(24)]
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["neg", "pos"]))
    adapters.train(
        model,
        rows,
        None,
        adapters.TrainConfig(max_steps=1, text_column="review", label_column="sentiment", progress=False),
    )
    model.save_pretrained(tmp_path / "art")
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    metrics = json.loads(in_process(capsys, "eval", tmp_path / "art", "--data", data).out)  # no column flags
    assert metrics["eval_count"] == 24
    assert '"text": "review"' in in_process(capsys, "info", tmp_path / "art").out


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c, t: c["head"].update(labels=["negative", "positive"]), "label 'pos' is not one of the head's labels"),
        (lambda c, t: c["train"].update(label_column="stars"), "no column 'stars'"),
        (lambda c, t: ((t / "art").mkdir(), (t / "art" / "notes.txt").write_text("mine")), "not a qadapters artifact"),
        (
            lambda c, t: (
                (t / "logs").mkdir(),
                (t / "logs" / "run.json").write_text("{}"),
                (t / "logs" / "qadapters-run.json").write_text('{"kind": "run", "created": ["run.json"]}'),
                c["train"].update(output_dir=str(t / "logs")),
            ),
            r"earlier run.*train.overwrite=true",
        ),
        (
            lambda c, t: (
                (t / "logs").mkdir(),
                (t / "logs" / "metrics.jsonl").write_text("{}"),
                c["train"].update(output_dir=str(t / "logs"), overwrite=True),
            ),
            r"holds \['metrics.jsonl'\], which are not a qadapters run",
        ),
    ],
)
def test_train_refuses_before_loading_the_model(config_file, tmp_path, capsys, monkeypatch, edit, match):
    """Bad rows and occupied folders are found before the (slow) model load, not after training."""
    import adapters.model

    config = yaml.safe_load(config_file.read_text())
    edit(config, tmp_path)
    config_file.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(adapters.model, "plan_load", lambda *a, **k: pytest.fail("the model was loaded"))
    err = in_process(capsys, "train", config_file, expect=2).err
    assert re.search(match, err), err


def test_help_texts_and_readme_agree_with_the_code():
    """Numbers a user reads in `--help` and in the README are the ones the code uses."""
    from pathlib import Path

    from adapters.cli import parser
    from adapters.data.batching import INFERENCE_TOKENS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    cpu, gpu = f"{INFERENCE_TOKENS['cpu']:,}", f"{INFERENCE_TOKENS['gpu']:,}"
    helps = {name: sub.format_help() for name, sub in _subparsers(parser()).items()}
    assert f"{cpu} padded tokens on CPU, {gpu} on GPUs" in " ".join(helps["eval"].split())
    assert f"batches of up to {cpu} padded tokens" in " ".join(readme.split())
    serve = " ".join(helps["serve"].split())
    assert "Content-Type: application/json" in serve  # the example a user copies answers 200
    for flag in ("--api-key", "--insecure", "--max-queue", "--timeout"):
        assert flag in serve and flag in readme


def _subparsers(main_parser):
    import argparse

    (action,) = [a for a in main_parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices
