"""Every example in the README works as written: each `qadapters` command line parses with the CLI's own
parser, each recipe command with the recipe's, each `make` target and file it names exists, every Python
block compiles, and the API example runs end to end on a tiny model (its names swapped for the tiny
model's, nothing else). The serving example's curl lines run against a live server in test_serve.py."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import tomllib

import adapters
from adapters.cli import parser

from .helpers import toy_sentiment

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def commands() -> list[str]:
    """The shell lines of the README's bash blocks, continuations joined, comments dropped."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_the_readme_has_examples_to_check():
    assert len(blocks("python")) >= 5 and sum(c.startswith("qadapters ") for c in commands()) >= 10


@pytest.mark.parametrize("line", [c for c in commands() if c.startswith("qadapters ")])
def test_every_qadapters_command_parses(line):
    args = parser().parse_args(shlex.split(line)[1:])
    assert callable(args.run)


@pytest.mark.parametrize("line", [c for c in commands() if not c.startswith(("qadapters ", "curl "))])
def test_every_other_command_names_what_exists(line):
    words = shlex.split(line)
    if words[:3] == ["pip", "install", "-e"]:  # the extras it names are the project's
        config = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert set(re.search(r"\[(.*)\]", words[3]).group(1).split(",")) <= set(config), line
        return
    if words[0] in ("lm_eval", "guidellm"):  # the very flags benchmarks/clients.py runs these clients with
        runner = (ROOT / "benchmarks" / "clients.py").read_text()
        flags = [w for w in words if w.startswith("--")] + re.findall(r"kind=[a-z_]+", line)
        assert all(flag in runner for flag in flags), [f for f in flags if f not in runner]
        return
    if words[0] == "make":
        targets = re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert words[1] in targets, line
        return
    configs = [w for w in words if w.endswith((".yaml", ".yml"))]
    if "-m" in words and words[words.index("-m") + 1] == "adapters":  # torchrun ... -m adapters <CLI>
        args = parser().parse_args(words[words.index("-m") + 2 :])
        assert callable(args.run) and all((ROOT / c).is_file() for c in configs), line
        return
    scripts = [w for w in words if w.endswith(".py")]
    assert scripts and all((ROOT / s).is_file() for s in scripts + configs), line
    script = scripts[0]
    if script.startswith("recipes/"):  # its flags parse with the recipe's own parser
        sys.path.insert(0, str(ROOT / "recipes"))
        try:
            recipe = __import__(Path(script).stem)
            recipe.parse_args(words[words.index(script) + 1 :])
        finally:
            sys.path.remove(str(ROOT / "recipes"))


@pytest.mark.parametrize("number", range(len(blocks("python"))))
def test_every_python_block_compiles(number):
    compile(blocks("python")[number], f"README python block {number}", "exec")


def test_the_api_example_runs_as_written(tiny_llama, tmp_path, monkeypatch):
    (example,) = [b for b in blocks("python") if "adapters.adapt(" in b and "again.predict" in b]
    code = example.replace('"smollm2-135m"', repr(tiny_llama)).replace('"runs/sentiment"', repr(str(tmp_path / "art")))
    code = code.replace('labels=["negative", "positive"]', 'labels=["neg", "pos"]')
    namespace = {"train_ds": toy_sentiment(16), "eval_ds": toy_sentiment(8, seed=1)}
    exec(compile(code, "README API example", "exec"), namespace)
    assert namespace["again"].predict(["a moving, funny film"])[0] in ("neg", "pos")
    assert "eval_accuracy" in namespace["metrics"]


def test_the_train_config_example_builds():
    (example,) = [b for b in blocks("python") if b.startswith("config = adapters.TrainConfig(")]
    namespace = {"adapters": adapters}
    exec(compile(example, "README TrainConfig example", "exec"), namespace)
    assert namespace["config"].early_stopping_metric == "eval_macro_f1"


def test_the_chat_example_runs_as_written(tiny_llama, tmp_path):
    """The causal-LM example on the tiny Llama given a chat template (its name swapped in, one training step)."""
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(base)
    (example,) = [b for b in blocks("python") if b.startswith("chat = adapters.adapt(")]
    code = example.replace('"smollm2-135m"', repr(str(base))).replace("epochs=3", "max_steps=1, progress=False")
    namespace = {"adapters": adapters}
    exec(compile(code, "README chat example", "exec"), namespace)
    assert isinstance(namespace["chat"].predict([[{"role": "user", "content": "Is MIT permissive?"}]])[0], str)
