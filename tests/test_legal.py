"""The legal recipe's data building, on a small sample of ScanCode-shaped files."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import legal  # noqa: E402

from adapters.data.sources import group_split  # noqa: E402

LICENCES = {  # key: (name, category)
    "mit": ("MIT License", "Permissive"),
    "bsd-new": ("BSD-3-Clause", "Permissive"),
    "isc": ("ISC License", "Permissive"),
    "x11": ("X11 License", "Permissive"),
    "gpl-2.0": ("GPL 2.0", "Copyleft"),
    "gpl-3.0": ("GPL 3.0", "Copyleft"),
    "agpl-3.0": ("AGPL 3.0", "Copyleft"),
    "osl-3.0": ("OSL 3.0", "Copyleft"),
    "lgpl-2.1": ("LGPL 2.1", "Copyleft Limited"),
    "acme-eula": ("ACME EULA", "Commercial"),
}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "licenses").mkdir()
    (tmp_path / "rules").mkdir()
    for key, (name, category) in LICENCES.items():
        (tmp_path / "licenses" / f"{key}.LICENSE").write_text(
            f"---\nkey: {key}\nshort_name: {name}\ncategory: {category}\n---\n\nThe full text of {name}. " * 2
        )
        for i in range(3):
            (tmp_path / "rules" / f"{key}_{i}.RULE").write_text(
                f"---\nlicense_expression: {key}\nis_license_notice: yes\n---\n"
                f"This file is licensed under the {name}, see the notice number {i} for details.\n"
            )
    # rules that must be left out: two licences, a tag (not a notice), too short
    (tmp_path / "rules" / "dual_1.RULE").write_text(
        "---\nlicense_expression: mit OR gpl-2.0\nis_license_notice: yes\n---\n"
        "Dual licensed under MIT or GPL 2.0 as you wish.\n"
    )
    (tmp_path / "rules" / "tag_1.RULE").write_text(
        "---\nlicense_expression: mit\nis_license_tag: yes\n---\nlicense: MIT\n"
    )
    (tmp_path / "rules" / "short_1.RULE").write_text(
        "---\nlicense_expression: mit\nis_license_notice: yes\n---\nMIT licensed\n"
    )
    return tmp_path


def test_notices_and_their_categories(root):
    licences = legal.read_licences(root)
    notices = legal.read_notices(root, licences)
    assert len(licences) == 10 and len(notices) == 30  # the dual, tag and short rules are out
    assert all(n["label"] == LICENCES[n["key"]][1] for n in notices)
    rows = legal.category_task(licences, notices)
    assert {r["label"] for r in rows} == set(legal.NOTICE_CATEGORIES)
    full = legal.category_full_task(licences, min_examples=2)
    assert {r["label"] for r in full} == {"Permissive", "Copyleft"}  # categories with enough texts


def test_split_never_shares_a_licence(root):
    licences = legal.read_licences(root)
    rows = legal.category_task(licences, legal.read_notices(root, licences))
    for seed in range(5):
        train, test = group_split(rows, "group", 0.3, seed)
        assert train and test and not {r["group"] for r in train} & {r["group"] for r in test}
        train, test = group_split(rows, "group", 0.3, seed, stratify="label")
        assert not {r["group"] for r in train} & {r["group"] for r in test}
        # every category with at least two licences is on both sides
        assert {r["label"] for r in test} >= {"Permissive", "Copyleft"} <= {r["label"] for r in train}


def test_notices_are_capped_per_licence(root):
    licences = legal.read_licences(root)
    notices = legal.read_notices(root, licences)
    capped = legal.cap_per_licence(notices, 2, seed=0)
    counts = {}
    for r in capped:
        counts[r["key"]] = counts.get(r["key"], 0) + 1
    assert set(counts) == set(LICENCES) and set(counts.values()) == {2}  # every licence kept, none above 2
    assert capped == [r for r in notices if r in capped]  # original order
    assert capped == legal.cap_per_licence(notices, 2, seed=0) and legal.cap_per_licence(notices, None) == notices


def test_stratifying_needs_one_value_per_group():
    from adapters.errors import DataError

    rows = [{"group": "a", "label": "x"}, {"group": "a", "label": "y"}, {"group": "b", "label": "x"}]
    with pytest.raises(DataError, match="several values"):
        group_split(rows, "group", 0.5, 0, stratify="label")


def test_identify_distractors_share_the_category_and_never_the_answer(root):
    licences = legal.read_licences(root)
    rows = legal.identify_task(licences, legal.read_notices(root, licences), choices=4, seed=1)
    assert rows and {r["group"] for r in rows} <= {k for k, v in LICENCES.items() if v[1] in ("Permissive", "Copyleft")}
    for r in rows:
        answer_key = r["choice_keys"][r["label"]]
        assert answer_key == r["group"] and r["choices"][r["label"]] == LICENCES[answer_key][0]
        others = [k for i, k in enumerate(r["choice_keys"]) if i != r["label"]]
        assert len(set(others)) == 3 and answer_key not in others
        assert all(LICENCES[k][1] == LICENCES[answer_key][1] for k in others)
    assert len({r["label"] for r in rows}) > 1  # the answer's position varies


def test_lexglue_shaped_files_map_their_columns(tmp_path):
    import json

    path = tmp_path / "ledgar.jsonl"
    path.write_text("".join(json.dumps({"text": f"clause {i}", "label": i % 3}) + "\n" for i in range(6)))
    args = legal.parse_args(["--data", str(path)])
    rows = legal.user_rows(args)
    assert [r["label"] for r in rows[:3]] == ["0", "1", "2"] and rows[0]["text"] == "clause 0"
    path = tmp_path / "unfair_tos.jsonl"
    path.write_text("".join(json.dumps({"text": f"term {i}", "labels": [i % 2]}) + "\n" for i in range(4)))
    rows = legal.user_rows(legal.parse_args(["--data", str(path)]))
    assert rows[1]["label"] == ["1"]


def test_recipe_end_to_end_on_a_users_file(tiny_llama, tmp_path):
    import json
    import random

    from .helpers import NEGATIVE, POSITIVE

    rng = random.Random(0)
    rows = [{"text": " ".join(rng.sample(POSITIVE if i % 2 else NEGATIVE, 2)), "label": i % 2} for i in range(60)]
    path = tmp_path / "ledgar.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = legal.main(
        [
            "--data",
            str(path),
            "--model",
            tiny_llama,
            "--epochs",
            "3",
            "--lr",
            "5e-3",
            "--batch-size",
            "8",
            "--output",
            str(tmp_path / "art"),
        ]
    )
    assert result["accuracy"] >= 0.7 and 0 <= result["macro_f1"] <= 1
    # the per-class F1s come from training's final evaluation (no second pass): they average to its macro-F1
    f1 = list(result["per_class_f1"].values())
    assert len(f1) == 2 and sum(f1) / 2 == pytest.approx(result["macro_f1"], abs=1e-4)
    assert (tmp_path / "art" / "confusion_matrix.png").exists() and (tmp_path / "art" / "results.json").exists()
    probed = legal.main(
        [
            "--data",
            str(path),
            "--model",
            tiny_llama,
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--linear-probe",
            "--pooling",
            "mean",
            "--output",
            str(tmp_path / "probed"),
        ]
    )
    saved = json.loads((tmp_path / "probed" / "results.json").read_text())
    assert saved["probe_rows"] == probed["train_rows"] and saved["probe_loss_after"] < saved["probe_loss_before"]
    assert saved["options"]["linear_probe"] is True and saved["options"]["pooling"] == "mean"  # what made the numbers


def test_export_feeds_the_yaml_configs(root, tmp_path, monkeypatch):
    import json

    from adapters.config.run_file import load_run_config

    monkeypatch.setattr(legal, "data_root", lambda: root)
    out = tmp_path / "identify.jsonl"
    assert legal.main(["--task", "identify", "--export", str(out)])["exported"] > 0
    row = json.loads(out.read_text().splitlines()[0])
    assert set(row) == {"text", "choices", "label", "group"} and len(row["choices"]) == 4
    config = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "legal_identify.yaml"
    run = load_run_config(config, [f"data.train={out}"])
    assert run.head.kind == "multiple_choice" and run.head.num_choices == 4
    assert run.head.scoring == "likelihood" and run.head.prompt == legal.IDENTIFY_PROMPT


def test_identify_scores_names_by_likelihood_where_the_base_allows(tiny_llama, tied_llama):
    head = legal.identify_head(legal.parse_args(["--task", "identify", "--model", tied_llama]))
    assert head.scoring == "likelihood" and head.prompt == legal.IDENTIFY_PROMPT
    untied = legal.identify_head(legal.parse_args(["--task", "identify", "--model", tiny_llama]))
    assert untied.scoring == "head" and untied.prompt is None  # no tied output embedding to score with
    bare = legal.identify_head(legal.parse_args(["--task", "identify", "--model", tied_llama, "--prompt", ""]))
    assert bare.scoring == "likelihood" and bare.prompt is None
    cue = legal.identify_head(
        legal.parse_args(["--task", "identify", "--model", tied_llama, "--prompt", "{text}\\nIt is"])
    )
    assert cue.prompt == "{text}\nIt is"  # '\n' as typed on a command line


@pytest.mark.parametrize(
    "argv",
    [
        ["--task", "category", "--zero-shot"],
        ["--task", "identify", "--scoring", "head", "--zero-shot"],
        ["--task", "category-full", "--scoring", "likelihood"],
        ["--task", "identify", "--linear-probe"],
        ["--task", "identify", "--pooling", "mean"],
        ["--adapter", "bottleneck", "--lora-init", "eva"],
    ],
)
def test_flags_are_refused_where_they_do_not_apply(argv):
    with pytest.raises(SystemExit):
        legal.parse_args(argv)


def test_identify_end_to_end_reports_the_zero_shot_accuracy(root, tied_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(legal, "data_root", lambda: root)
    result = legal.main(
        [
            "--task",
            "identify",
            "--model",
            tied_llama,
            "--zero-shot",
            "--quantization",
            "none",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--output",
            str(tmp_path / "art"),
        ]
    )
    assert 0 <= result["zero_shot_accuracy"] <= 1 and 0 <= result["accuracy"] <= 1 and result["train_rows"] > 0
    saved = json.loads((tmp_path / "art" / "results.json").read_text())
    assert saved["zero_shot_accuracy"] == result["zero_shot_accuracy"]


def test_label_words_come_one_per_category_in_order():
    labels = ["Commercial", "Copyleft", "Copyleft Limited", "Permissive"]
    args = legal.parse_args(["--task", "category", "--label-words", "proprietary, copyleft,lesser,permissive"])
    assert legal.label_words(args, labels) == [" proprietary", " copyleft", " lesser", " permissive"]
    assert legal.label_words(legal.parse_args(["--task", "category"]), labels) is None
    with pytest.raises(SystemExit, match="4 comma-separated words"):
        legal.label_words(legal.parse_args(["--task", "category", "--label-words", "a,b"]), labels)
    with pytest.raises(SystemExit):
        legal.parse_args(["--task", "identify", "--label-words", "a,b,c,d"])


def test_each_task_defaults_to_its_measured_budget_and_flags_win():
    full = legal.parse_args(["--task", "category-full"])
    assert (
        full.train_size,
        full.eval_size,
        full.max_length,
        full.pooling,
        full.linear_probe,
        full.long_text,
        full.epochs,
    ) == (1000, 300, 256, "mean", True, "truncate", 1)
    notices = legal.parse_args(["--task", "category"])
    assert (notices.train_size, notices.max_length, notices.pooling, notices.linear_probe, notices.epochs) == (
        2000,
        128,
        "mean",
        True,
        2,
    )
    names = legal.parse_args(["--task", "identify"])  # its head scores names: no pooled vector, nothing to probe
    assert (names.pooling, names.linear_probe, names.epochs) == ("auto", False, 1)
    own = legal.parse_args(["--task", "category", "--data", "ledgar.jsonl"])  # a user's data: the plain defaults
    assert (own.pooling, own.linear_probe, own.epochs) == ("auto", False, 1)
    mine = legal.parse_args(["--task", "category-full", "--no-linear-probe", "--pooling", "last", "--max-length", "64"])
    assert (mine.linear_probe, mine.pooling, mine.max_length, mine.train_size) == (False, "last", 64, 1000)
    # LoRA's start: EVA on a 4-bit base (benchmarks/results/lora-init-legal.md), peft's default otherwise
    assert notices.lora_init == "default" and legal.parse_args(["--quantization", "nf4"]).lora_init == "eva"
    assert legal.parse_args(["--quantization", "nf4", "--lora-init", "loftq"]).lora_init == "loftq"
    assert legal.parse_args(["--quantization", "nf4", "--adapter", "bottleneck"]).lora_init == "default"
    assert legal.parse_args(["--quantization", "nf4", "--task", "identify"]).lora_init == "default"  # pairs
    windows = ["--quantization", "nf4", "--task", "category-full", "--long-text", "windows"]
    assert legal.parse_args(windows).lora_init == "default"


@pytest.mark.parametrize(
    "task, config", [("category", "legal_category.yaml"), ("category-full", "legal_category_full.yaml")]
)
def test_the_yaml_configs_run_what_the_recipe_measured(task, config):
    from adapters.config.run_file import load_run_config

    run = load_run_config(Path(__file__).resolve().parents[1] / "recipes" / "configs" / config)
    measured = legal.TASK_DEFAULTS[task]
    assert (
        run.head.pooling,
        run.train.linear_probe,
        run.model.max_length,
        run.train.epochs,
        run.data.train_size,
        run.data.eval_size,
    ) == (
        measured["pooling"],
        measured["linear_probe"],
        measured["max_length"],
        measured["epochs"],
        measured["train_size"],
        measured["eval_size"],
    )
    assert run.model.quantization is None and run.train.lr == 5e-4 and run.train.head_lr == 2e-3  # the recipe's


def test_front_matter_reads_what_pyyaml_reads():
    """The fast loader (libyaml's, where PyYAML has it) reads every field of real ScanCode files as PyYAML's own
    safe loader does: dates, lists, booleans and the licence text after the front matter."""
    import yaml

    root = legal.data_root()
    paths = sorted((root / "licenses").glob("*.LICENSE"))[:60] + sorted((root / "rules").glob("*.RULE"))[:200]
    for path in paths:
        meta, text = legal._front_matter(path)
        front, _, rest = path.read_text(encoding="utf-8", errors="replace").partition("\n---")
        assert meta == (yaml.safe_load(front.removeprefix("---")) or {}), path.name
        assert text and text in rest, path.name
