"""YAML run configs, in-process: values coerced as YAML users write them, every bad key named."""

import pytest
import yaml

import adapters
from adapters.config.run_file import build, load_run_config


def _write(tmp_path, config: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


BASE = {
    "model": {"name": "minilm-l6"},
    "head": {"kind": "classification", "labels": ["a", "b"]},
    "data": {"train": "rotten_tomatoes"},
}


def test_exponent_without_a_dot_is_a_float(tmp_path):
    """PyYAML reads 1e-4 as a string (YAML 1.1 wants a dot); a float field takes it as the number."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE) + "train:\n  lr: 1e-4\n  head_lr: 3E-3\n  epochs: 2\n")
    run = load_run_config(path)
    assert run.train.lr == 1e-4 and run.train.head_lr == 3e-3 and run.train.epochs == 2


def test_strings_that_are_not_numbers_stay_refused():
    with pytest.raises(adapters.ConfigError, match=r"train.lr='fast' has the wrong type"):
        build(adapters.TrainConfig, {"lr": "fast"}, "train")
    with pytest.raises(adapters.ConfigError, match=r"train.batch_size='16' has the wrong type"):
        build(adapters.TrainConfig, {"batch_size": "16"}, "train")  # counts are never coerced


def test_adapter_kind_defaults_to_lora_and_none_means_head_only(tmp_path):
    assert isinstance(load_run_config(_write(tmp_path, BASE)).adapter, adapters.LoRA)
    assert load_run_config(_write(tmp_path, {**BASE, "adapter": {"kind": "none"}})).adapter is None
    with pytest.raises(adapters.ConfigError, match="takes no other keys"):
        load_run_config(_write(tmp_path, {**BASE, "adapter": {"kind": "none", "r": 4}}))


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    run = load_run_config(
        _write(tmp_path, BASE),
        ["train.lr=5e-4", "adapter.r=16", "train.packing=false", "adapter.targets=[q_proj, v_proj]"],
    )
    assert run.train.lr == 5e-4 and run.adapter.r == 16 and run.train.packing is False
    assert run.adapter.targets == ["q_proj", "v_proj"]


def test_every_adapter_and_head_kind_is_reachable_from_yaml(tmp_path):
    from adapters.registry import ADAPTERS, HEADS

    for kind in ADAPTERS:
        assert load_run_config(_write(tmp_path, {**BASE, "adapter": {"kind": kind}})).adapter.kind == kind
    assert set(HEADS) == {
        "classification",
        "multi_label",
        "regression",
        "multiple_choice",
        "token_classification",
        "causal_lm",
    }
