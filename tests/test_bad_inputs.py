"""Bad input, as real users produce it, ends in a typed error that names the problem and the fix.

One table, one line per case: files, rows, configs, artifacts, folders and command lines. Each case
is (id, where it goes in, the input, the error class, a regex the message must match). A new case is
one line; its runner says how the input reaches the library.
"""

import json
import shutil

import pytest
import yaml

import adapters
from adapters.artifacts.merge import merge_artifact
from adapters.cli import main as cli
from adapters.config.run_file import load_run_config
from adapters.data.sources import load_rows

LABELS = ["neg", "pos"]
GOOD = {"text": "good fun film", "label": "pos"}


def _file(tmp_path, spec):
    name, content = spec
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return load_rows(str(path))


def _rows(tmp_path, rows, model=None):
    return adapters.train(model, rows, None, adapters.TrainConfig(max_steps=1, batch_size=4, progress=False))


def _eval_rows(tmp_path, rows, model=None):
    return adapters.evaluate(model, rows)


def _config(tmp_path, kwargs):
    return adapters.TrainConfig(**kwargs)


def _yaml(tmp_path, edit):
    config = {
        "model": {"name": "minilm-l6"},
        "head": {"kind": "classification", "labels": LABELS},
        "data": {"train": "rotten-tomatoes"},
    }
    text = edit(config)
    path = tmp_path / "run.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(config))
    return load_run_config(path)


def _artifact(tmp_path, damage, artifact=None):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    action = damage(art)
    return action() if callable(action) else adapters.load(art)


def _edited(tmp_path, edit, artifact=None):
    """An artifact whose spec was edited on purpose, opened unverified (``verify=False``): the checks behind
    the manifest's still hold."""
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    action = edit(art)
    return action() if callable(action) else adapters.load(art, verify=False)


def _folder(tmp_path, act, model=None):
    return act(tmp_path, model)


def _file_rows(tmp_path, spec, model=None):
    """A file read as the library reads it, then trained on: errors name the file's own lines."""
    return _rows(tmp_path, _file(tmp_path, spec), model)


def _cli(tmp_path, args, capsys=None, artifact=None):
    (tmp_path / "good.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "empty.csv").write_text("text\n")
    (tmp_path / "neutral.csv").write_text("text,label\ngood,pos\nmeh,neutral\n")
    args = [str(a).format(tmp=tmp_path, art=artifact) for a in args]
    code = cli(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: "), err
    raise adapters.AdaptersError(err)  # the message, checked like the others


def _json(path, edit):
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))


def _flip(path, at=-8):
    """One byte of ``path`` flipped, in the tensor data (the end of a safetensors file)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


CASES = [
    # files a user points at
    (
        "latin-1 csv",
        _file,
        ("reviews.csv", "text,label\nsoirée ratée,neg\n".encode("latin-1")),
        adapters.DataError,
        r"not UTF-8 .*iconv",
    ),
    ("empty csv", _file, ("reviews.csv", ""), adapters.DataError, r"reviews.csv is empty"),
    (
        "header-only csv",
        _file,
        ("reviews.csv", "text,label\n"),
        adapters.DataError,
        r"has a header \(text, label\) but no rows",
    ),
    (
        "ragged csv",
        _file,
        ("reviews.csv", 'text,label\n"good",pos,extra,more\n"a\n'),
        adapters.DataError,
        r"not valid CSV",
    ),
    (
        "bad jsonl line",
        _file,
        ("rows.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", label}\n'),
        adapters.DataError,
        r"rows.jsonl line 2 is not valid JSON",
    ),
    ("jsonl of lists", _file, ("rows.jsonl", '["a", "pos"]\n'), adapters.DataError, r"line 1 holds a JSON list"),
    ("unknown file type", _file, ("rows.xlsx", "x"), adapters.DataError, r"unsupported file type '.xlsx'"),
    ("missing file", _file, ("missing.csv", None), adapters.DataError, r"does not exist"),
    # rows that reach train / evaluate
    ("no rows", _rows, [], adapters.DataError, r"train dataset is empty"),
    (
        "nan text",
        _rows,
        [GOOD, {"text": float("nan"), "label": "neg"}],
        adapters.DataError,
        r"row 2: column 'text' is empty \(NaN",
    ),
    (
        "mixed label types",
        _rows,
        [GOOD] * 3 + [{"text": "bad", "label": 1}],
        adapters.DataError,
        r"row 4: column 'label' holds number .* but train dataset row 1 holds text",
    ),
    (
        "unknown label",
        _rows,
        [GOOD, {"text": "meh", "label": "neutral"}],
        adapters.DataError,
        r"row 2: label 'neutral' is not one of the head's labels",
    ),
    ("label id out of range", _rows, [{"text": "x", "label": 2}], adapters.DataError, r"label id 2 is out of range"),
    (
        "missing text column",
        _rows,
        [{"review": "x", "label": "pos"}],
        adapters.DataError,
        r"no column 'text'.*--text-column",
    ),
    (
        "text that is a number",
        _rows,
        [{"text": 5, "label": "pos"}],
        adapters.DataError,
        r"row 1: column 'text' holds int",
    ),
    (
        "columns of unequal length",
        _rows,
        {"text": ["a", "b"], "label": ["pos"]},
        adapters.DataError,
        r"columns differ in length",
    ),
    ("rows that are not dicts", _rows, [("good", "pos")], adapters.DataError, r"list of dicts, got rows of tuple"),
    ("eval rows without labels", _eval_rows, [{"text": "x"}], adapters.DataError, r"no column 'label'"),
    # configs
    ("lr as text", _config, {"lr": "abc"}, adapters.ConfigError, r"lr='abc'.*finite number"),
    ("lr infinite", _config, {"lr": float("inf")}, adapters.ConfigError, r"finite number"),
    ("batch size as float", _config, {"batch_size": 8.5}, adapters.ConfigError, r"batch_size=8.5.*integer"),
    ("zero epochs", _config, {"epochs": 0}, adapters.ConfigError, r"epochs=0 must be > 0"),
    ("unknown optimizer", _config, {"optimizer": "sgd"}, adapters.ConfigError, r"optimizer='sgd' must be one of"),
    ("resume without output_dir", _config, {"resume": "auto"}, adapters.ConfigError, r"need an output_dir"),
    ("yaml unknown key", _yaml, lambda c: c.update(train={"lrr": 1}), adapters.ConfigError, r"unknown key train.lrr"),
    (
        "yaml unknown adapter",
        _yaml,
        lambda c: c.update(adapter={"kind": "prefix"}),
        adapters.ConfigError,
        r"adapter.kind='prefix' must be one of",
    ),
    ("yaml without head", _yaml, lambda c: c.pop("head"), adapters.ConfigError, r"needs a head section"),
    ("yaml not yaml", _yaml, lambda c: "model: [unclosed\n", adapters.ConfigError, r"not valid YAML"),
    ("yaml head labels a string", _yaml, lambda c: c["head"].update(labels="neg"), adapters.ConfigError, r"labels"),
    # artifacts damaged, edited or moved
    (
        "artifact without spec",
        _artifact,
        lambda a: (a / "qadapters.json").unlink(),
        adapters.CheckpointError,
        r"qadapters.json is missing: the artifact at .* is incomplete",
    ),
    (
        "artifact spec not json",
        _artifact,
        lambda a: (a / "qadapters.json").write_text("{"),
        adapters.CheckpointError,
        r"qadapters.json has 1 bytes, \d+ were written: it is truncated or corrupt",
    ),
    (
        "artifact spec not json, unverified",
        _edited,
        lambda a: (a / "qadapters.json").write_text("{"),
        adapters.CheckpointError,
        r"qadapters.json is corrupt",
    ),
    (
        "artifact labels reordered",
        _artifact,
        lambda a: _json(a / "qadapters.json", lambda s: s["head"].update(labels=s["head"]["labels"][::-1])),
        adapters.CheckpointError,
        r"qadapters.json (differs from what was written|has \d+ bytes, \d+ were written)",
    ),
    (
        "artifact tensor byte flipped",
        _artifact,
        lambda a: _flip(a / "head.safetensors"),
        adapters.CheckpointError,
        r"head.safetensors differs from what was written \(sha256 mismatch\).*verify=False",
    ),
    (
        "artifact max_length not a number",
        _edited,
        lambda a: _json(a / "qadapters.json", lambda s: s.update(max_length="lots")),
        adapters.CheckpointError,
        r"max_length='lots' is not of type int",
    ),
    (
        "artifact head missing",
        _artifact,
        lambda a: (a / "head.safetensors").unlink(),
        adapters.CheckpointError,
        r"head.safetensors is missing",
    ),
    (
        "artifact head truncated",
        _artifact,
        lambda a: (a / "head.safetensors").write_bytes(b"\x00" * 9),
        adapters.CheckpointError,
        r"head.safetensors has 9 bytes, \d+ were written: it is truncated or corrupt",
    ),
    (
        "artifact adapter file missing",
        _artifact,
        lambda a: (a / "adapter" / "adapter_model.safetensors").unlink(),
        adapters.CheckpointError,
        r"adapter_model.safetensors is missing",
    ),
    (
        "artifact head kind unknown",
        _edited,
        lambda a: _json(a / "qadapters.json", lambda s: s["head"].update(kind="x")),
        adapters.CheckpointError,
        r"garbles its 'head' entry",
    ),
    (
        "artifact labels edited",
        _edited,
        lambda a: _json(a / "qadapters.json", lambda s: s["head"].update(labels=["a", "b", "c"])),
        adapters.CheckpointError,
        r"head.safetensors: tensor score.weight has shape \(2, 64\), the model expects \(3, 64\)",
    ),
    (
        "artifact quantization edited",
        _edited,
        lambda a: _json(a / "qadapters.json", lambda s: s.update(quantization="int8")),
        adapters.CheckpointError,
        r"says quantization='int8' but its tensors were trained on a 'nf4' base",
    ),
    (
        "artifact format from the future",
        _edited,
        lambda a: _json(a / "qadapters.json", lambda s: s.update(format_version=9)),
        adapters.CheckpointError,
        r"artifact format 9",
    ),
    (
        "artifact base moved away",
        _edited,
        lambda a: _json(a / "qadapters.json", lambda s: s["base"].update(path="../nowhere")),
        adapters.CheckpointError,
        r"not there; pass base=",
    ),
    (
        "merge with a damaged head",
        _edited,
        lambda a: (
            _json(a / "qadapters.json", lambda s: s["head"].update(labels=["a", "b", "c", "d"])),
            lambda: merge_artifact(a, a.parent / "merged", verify=False),
        )[1],
        adapters.CheckpointError,
        r"has shape \(2, 64\), the model expects \(4, 64\)",
    ),
    (
        "merge into a user's folder",
        _artifact,
        lambda a: (
            (a.parent / "mine").mkdir(),
            (a.parent / "mine" / "notes.txt").write_text("x"),
            lambda: merge_artifact(a, a.parent / "mine", overwrite=True),
        )[2],
        adapters.ConfigError,
        r"not a qadapters merge",
    ),
    # folders the library writes into
    (
        "save into a file",
        _folder,
        lambda t, m: (t / "f").write_text("x") and m.save_pretrained(t / "f"),
        adapters.ConfigError,
        r"is a file",
    ),
    (
        "save into a user's folder",
        _folder,
        lambda t, m: ((t / "out").mkdir(), (t / "out" / "notes.txt").write_text("x"), m.save_pretrained(t / "out")),
        adapters.ConfigError,
        r"not a qadapters artifact.*none is deleted",
    ),
    (
        "overwrite onto a user's file of the same name",
        _folder,
        lambda t, m: (
            (t / "out").mkdir(),
            (t / "out" / "README.md").write_text("mine"),
            m.save_pretrained(t / "out", overwrite=True),
        ),
        adapters.ConfigError,
        r"already holds \['README.md'\]",
    ),
    # the command line
    (
        "cli predict input missing",
        _cli,
        ["predict", "{art}", "--input", "{tmp}/nope.jsonl"],
        adapters.AdaptersError,
        r"--input .*nope.jsonl does not exist",
    ),
    (
        "cli predict output exists",
        _cli,
        ["predict", "{art}", "--input", "{tmp}/good.jsonl", "--output", "{tmp}/good.jsonl"],
        adapters.AdaptersError,
        r"--output .* exists",
    ),
    (
        "cli eval wrong column",
        _cli,
        ["eval", "{art}", "--data", "{tmp}/good.jsonl", "--text-column", "review"],
        adapters.AdaptersError,
        r"no column 'review'.*--text-column",
    ),
    ("cli info on no artifact", _cli, ["info", "{tmp}"], adapters.AdaptersError, r"has no qadapters.json"),
    # files whose rows are bad, named by the file's own 1-based line
    (
        "empty text in a csv",
        _file_rows,
        ("reviews.csv", "text,label\ngood fun,pos\n,neg\n"),
        adapters.DataError,
        r"reviews.csv line 3: column 'text' is empty",
    ),
    (
        "blank text in a jsonl",
        _file_rows,
        ("rows.jsonl", '{"text": "good", "label": "pos"}\n\n{"text": "  ", "label": "neg"}\n'),
        adapters.DataError,
        r"rows.jsonl line 3: column 'text' is empty",
    ),
    (
        "unknown label on a csv line",
        _file_rows,
        ("reviews.csv", "text,label\ngood,pos\nmeh,neutral\n"),
        adapters.DataError,
        r"reviews.csv line 3: label 'neutral' is not one of",
    ),
    ("blank text in rows", _rows, [GOOD, {"text": " ", "label": "neg"}], adapters.DataError, r"row 2: .*is empty"),
    (
        "tracker not installed",
        _config,
        {"report_to": ["clearml"]},
        adapters.ConfigError,
        r"'clearml' is not installed",
    ),
    (
        "cli predict csv with no rows",
        _cli,
        ["predict", "{art}", "--input", "{tmp}/empty.csv", "--output", "{tmp}/o.jsonl"],
        adapters.AdaptersError,
        r"has a header \(text\) but no rows",
    ),
    (
        "cli eval unknown label",
        _cli,
        ["eval", "{art}", "--data", "{tmp}/neutral.csv"],
        adapters.AdaptersError,
        r"neutral.csv line 3: label 'neutral'",
    ),
    (
        "cli generation flags on a classifier",
        _cli,
        ["predict", "{art}", "text", "--temperature", "0.7"],
        adapters.AdaptersError,
        r"--temperature: generation settings.*does not generate",
    ),
    (
        "cli serve beyond this machine without a key",
        _cli,
        ["serve", "{art}", "--host", "0.0.0.0"],
        adapters.AdaptersError,
        r"--api-key.*--insecure",
    ),
]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=LABELS))


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "art"
    model.save_pretrained(path)
    return path


def test_the_table_is_long_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,runner,value,error,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_typed_error(name, runner, value, error, match, tmp_path, model, artifact, capsys):
    extra = {
        _rows: {"model": model},
        _file_rows: {"model": model},
        _eval_rows: {"model": model},
        _folder: {"model": model},
        _artifact: {"artifact": artifact},
        _edited: {"artifact": artifact},
        _cli: {"capsys": capsys, "artifact": artifact},
    }.get(runner, {})
    if runner is _file and value[1] is None:
        value = (value[0], None)
        with pytest.raises(error, match=match):
            load_rows(str(tmp_path / value[0]))
        return
    with pytest.raises(error, match=match):
        runner(tmp_path, value, **extra)
