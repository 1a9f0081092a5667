"""The benchmarks' quick modes produce well-formed results (tables, JSON, plots), checked on a
tiny model; the numbers themselves are measured by running the scripts, not asserted here."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_methods_quick(tiny_llama, tmp_path):
    import methods

    methods.main(
        [
            "--quick",
            "--warm-start",
            "--model",
            tiny_llama,
            "--methods",
            "head only",
            "QLoRA nf4",
            "bottleneck Pfeiffer nf4",
            "--name",
            "m",
            "--out",
            str(tmp_path),
        ]
    )
    payload = json.loads((tmp_path / "m.json").read_text())
    assert [r["method"] for r in payload["results"]] == ["head only", "QLoRA nf4", "bottleneck Pfeiffer nf4"]
    for r in payload["results"]:
        assert r["trainable"] > 0 and r["peak_mb"] > 0 and r["examples_per_second"] > 0
        # a share of the held-out rows, each counted once (the tiny random model is near chance on real text)
        assert r["eval_count"] == payload["budget"]["eval"] and _is_share(r["accuracy"], r["eval_count"])
    assert payload["results"][0]["trainable"] < payload["results"][1]["trainable"]
    assert payload["machine"]["cpu"] and "| QLoRA nf4 |" in (tmp_path / "m.md").read_text()
    assert (tmp_path / "m.png").stat().st_size > 10_000


def _is_share(value: float, count: int) -> bool:
    """``value`` is k / count for a whole k: a metric counted over ``count`` real rows."""
    return count > 0 and abs(value * count - round(value * count)) < 1e-6


@pytest.mark.slow
def test_vs_peft_trainer_quick(tiny_llama, tmp_path):
    import vs_peft_trainer

    ablation = ["baseline", "ours-grouped", "ours-plain", "ours-bf16", "baseline-grouped-bf16"]
    vs_peft_trainer.main(
        [
            "--quick",
            "--warm-start",
            "--model",
            tiny_llama,
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            "--ablation",
            *ablation,
        ]
    )
    payload = json.loads((tmp_path / "vs_peft_trainer-quick.json").read_text())
    runs = payload["runs"]
    assert all(len(runs[side]) == 1 for side in ("ours", "baseline-grouped", *ablation))
    assert all(len(payload["live_memory_runs"][side]) == 1 for side in ("ours", "baseline-grouped"))
    assert runs["ours"][0]["steps"] == runs["baseline"][0]["steps"] == 6  # same budget
    for pair in ("ours/baseline", "ours/baseline-grouped", "ours/baseline-grouped-bf16"):
        for key in ("train_seconds", "eval_seconds", "predict_seconds", "peak_mb", "accuracy", "real_token_fraction"):
            assert payload["summary"][pair][key]["ratio_median"] > 0
    assert payload["summary"]["live_memory"]["peak_mb"]["ratio_median"] > 0
    # the levers do what they say: packing computes almost no padding, grouping less than random batches
    assert runs["ours"][0]["real_token_fraction"] > 0.95
    assert runs["ours-grouped"][0]["real_token_fraction"] > runs["ours-plain"][0]["real_token_fraction"]
    assert "**Ablation**" in (tmp_path / "vs_peft_trainer-quick.md").read_text()


@pytest.mark.slow
def test_scaling_quick(tiny_llama, tmp_path):
    import scaling

    scaling.main(
        [
            "--quick",
            "--warm-start",
            "--model",
            tiny_llama,
            "--lengths",
            "16",
            "32",
            "--at-batch",
            "1",
            "--batches",
            "1",
            "--at-length",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    payload = json.loads((tmp_path / "scaling-quick.json").read_text())
    rows = payload["results"]
    # the length sweep (16, 32 at batch 1) and the batch sweep (1 at length 16) share (16, 1): run once
    assert len(rows) == 2 * 2 * 2  # adapters x settings x checkpointing
    assert {(r["adapter"], r["length"], r["batch"], r["checkpointing"]) for r in rows} == {
        (a, n, b, c) for a in scaling.ADAPTERS for n, b in ((16, 1), (32, 1)) for c in (False, True)
    }
    assert all(r["tokens_per_second"] > 0 and r["peak_mb"] > 0 for r in rows)
    assert (tmp_path / "scaling-quick.png").stat().st_size > 10_000


@pytest.mark.slow
def test_memory_accuracy_quick(tiny_llama, tmp_path):
    import memory_accuracy

    memory_accuracy.main(["--quick", "--warm-start", "--model", tiny_llama, "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "memory_accuracy-quick.json").read_text())
    assert len(payload["rows"]) == 4 and payload["summary"]["cells"] == 4
    for row in payload["rows"]:
        assert row["estimate_mib"] > 0 and row["measured_mib"] > 0
        assert row["error"] == pytest.approx(row["estimate_mib"] / row["measured_mib"] - 1)
    assert "| error |" in (tmp_path / "memory_accuracy-quick.md").read_text()
    assert (tmp_path / "memory_accuracy-quick.png").stat().st_size > 10_000


@pytest.mark.slow
def test_methods_quick_on_the_legal_task(tiny_llama, tmp_path):
    import methods

    methods.main(
        [
            "--quick",
            "--warm-start",
            "--task",
            "legal",
            "--model",
            tiny_llama,
            "--methods",
            "QLoRA nf4",
            "--name",
            "m",
            "--out",
            str(tmp_path),
        ]
    )
    payload = json.loads((tmp_path / "m.json").read_text())
    assert payload["task"] == "legal" and payload["budget"]["train"] == 160
    row = payload["results"][0]
    assert row["method"] == "QLoRA nf4" and row["steps"] == 10 and _is_share(row["accuracy"], row["eval_count"])
    assert "Legal category" in (tmp_path / "m.md").read_text()


@pytest.mark.slow  # a subprocess run end to end; `make test` runs it
def test_gpu_check_dry_run(tmp_path):
    """The GPU check's every part, on CPU at tiny sizes: the first GPU run is not the first run."""
    import gpu_check

    assert gpu_check.main(["--dry-run", "--memory-cells", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu-check-dry-run.json").read_text())
    assert set(result["parts"]) == {"correctness", "fsdp", "shard-load", "memory", "throughput", "scale", "recipe"}
    assert result["parts"]["fsdp"]["summary"]["nf4_bytes_unchanged"]
    assert result["parts"]["shard-load"]["summary"]["chunks_equal"]
    assert all(part["status"] == "passed" for part in result["parts"].values())
    assert len(result["parts"]["correctness"]["tests"]["passed"]) >= 20
    assert "| correctness | passed |" in (tmp_path / "gpu-check-dry-run.md").read_text()


def test_gpu_check_skips_without_cuda(capsys):
    import gpu_check
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main([]) == 0
    assert "no CUDA device: GPU check skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_lora_layers_quick(tiny_llama, tmp_path):
    import lora_layers

    payload = lora_layers.main(["--quick", "--warm-start", "--model", tiny_llama, "--out", str(tmp_path)])
    runs = payload["runs"]
    assert runs["ours"][0]["lora_layers"] is None and runs["ours-top-half"][0]["lora_layers"] == [1]
    # the top block only: half the LoRA parameters of the 2-block model, the same head
    assert runs["ours-top-half"][0]["trainable"] < runs["ours"][0]["trainable"]
    assert "| top half of the blocks | 1-1 |" in (tmp_path / "lora_layers-quick.md").read_text()


@pytest.mark.slow
def test_lora_inference_quick(tiny_llama, tmp_path):
    import lora_inference

    payload = lora_inference.main(
        ["--quick", "--warm-start", "--model", tiny_llama, "--rounds", "1", "--out", str(tmp_path)]
    )
    assert {side: len(runs) for side, runs in payload["runs"].items()} == {"peft": 1, "lean-8192": 1, "lean": 1}
    assert payload["same_loss"]  # the lean path computes peft's numbers
    assert all(r[0]["rows"] == 40 and r[0]["eval_seconds"] > 0 for r in payload["runs"].values())
    assert "| lean path" in (tmp_path / "lora_inference-quick.md").read_text()


@pytest.mark.slow
def test_mixed_batch_quick(tiny_llama, tmp_path):
    """Every way of decoding a batch that mixes adapters gives the same greedy tokens; the table names them."""
    import mixed_batch

    payload = mixed_batch.main(["--quick", "--warm-start", "--model", tiny_llama, "--out", str(tmp_path)])
    runs = payload["runs"]["none"]
    assert set(runs) == set(mixed_batch.SIDES) and all(r[0]["step_ms"] > 0 for r in runs.values())
    table = (tmp_path / "mixed_batch-quick.md").read_text()
    assert "| fp32 | segmented step (default" in table and "| NO |" not in table


@pytest.mark.slow
def test_serve_overload_quick(tiny_llama, tmp_path):
    import serve

    payload = serve.main(["--overload", "--quick", "--model", tiny_llama, "--max-queue", "4", "--out", str(tmp_path)])
    assert payload["sent"] == payload["admitted"] + payload["refused_503"] + payload["other_failures"]
    assert payload["other_failures"] == 0 and payload["refused_with_retry_after"] == payload["refused_503"]
    assert "| offered load" in (tmp_path / "serve-overload-quick.md").read_text()


@pytest.mark.slow
def test_serve_generation_quick(tiny_llama, tmp_path):
    import serve

    payload = serve.main(["--generation", "--quick", "--warm-start", "--model", tiny_llama, "--out", str(tmp_path)])
    levels = payload["rounds"]["fp32"]["levels"]
    assert set(levels) == {"1 client", "4 clients, 2 adapters", "4 clients, 1 adapter"}
    assert all(r["tokens_per_second"] > 0 for r in levels.values())
    one = payload["rounds"]["fp32"]["one_client"]
    assert len(one["served_tokens_per_second"]) == len(one["generate_tokens_per_second"]) == 1
    assert one["ratio_of_medians"] > 0
    assert payload["rounds"]["fp32"]["in_process"]["generate_batch_tokens_per_second"] > 0  # beside, no error
    assert set(payload["rounds"]["fp32"]["prefill_ms"]) == {"1", "8", "16"}
    assert all(ms > 0 for ms in payload["rounds"]["fp32"]["prefill_ms"].values())
    assert "| base | clients | tokens/s |" in (tmp_path / "serve-generation-quick.md").read_text()


def test_shape_presets_build_the_released_models_sizes():
    """Parameter counts of the random-weight presets, built on the meta device, against the released models'."""
    import shapes

    for name, shape in shapes.PRESETS.items():
        built = shapes.parameter_count(name)
        assert abs(built / shape.parameters - 1) < 0.01, (name, built, shape.parameters)


def test_a_shape_is_written_in_shards_with_the_packaged_tokenizer(tmp_path):
    """The 8B preset at a tiny width (as the GPU check's dry run writes it): sharded safetensors with an index,
    a config that loads, the packaged tokenizer, and a note that the weights are random."""
    import json

    import shapes
    from transformers import AutoConfig, AutoTokenizer

    tiny = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}
    tiny.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=49152)
    folder = shapes.write("llama-3.1-8b", tmp_path / "shape", progress=False, **tiny)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(shapes.tensor_shapes(shapes.config_for("llama-3.1-8b", **tiny)))
    assert AutoConfig.from_pretrained(folder).num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(folder).vocab_size <= 49152
    assert "Random weights" in (folder / "RANDOM_WEIGHTS.txt").read_text()
    assert shapes.write("llama-3.1-8b", folder, progress=False, **tiny) == folder  # complete: reused, not rewritten


def test_precision_quick(tmp_path):
    import precision

    precision.main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "precision-quick.json").read_text())
    (row,) = payload["rows"]
    assert row["fp32_gflops"] > 0 and row["bf16_gflops"] > 0
    assert payload["decision"]["auto_mixed_precision"] in ("bf16", "no")
    assert "bf16 / fp32" in (tmp_path / "precision-quick.md").read_text()


def test_throughput_reports_the_compiled_side():
    """``throughput.py --compile``'s summary and table from given runs (the runs themselves need a GPU to mean
    anything; tests/test_compile.py checks the compiled model)."""
    import argparse

    import throughput

    def run(seconds, compile_seconds=None):
        return {
            "seconds": seconds,
            "steps": 10,
            "tokens": 10_000,
            "flops_per_token": 1e9,
            "peak_mb": 100.0,
            "compile_seconds": compile_seconds,
        }

    runs = {"ours": [run(10.0)], "baseline": [run(20.0)], "ours-compiled": [run(8.0, 3.5)]}
    summary = throughput.summarise(runs, "NVIDIA H200")
    assert summary["speedup"] == 2.0 and summary["compiled_speedup"] == 2.5
    assert summary["ours-compiled"]["compile_seconds"] == 3.5 and summary["ours"]["compile_seconds"] is None
    args = argparse.Namespace(model="m", batch=16, seq_len=512, steps=10, repeats=1)
    text = throughput.table(summary, args)
    assert "| ours-compiled |" in text and "| 3.5 |" in text and "compiled/baseline tokens/s x2.50" in text
    clock = throughput.StepClock()
    clock.times = [0.0, 5.0, 6.0, 7.0, 8.0]
    assert clock.first_step_excess() == 4.0


def test_lora_init_table_reads_the_saved_runs(tmp_path, monkeypatch):
    """benchmarks/lora_init.py: each configuration's seeds, mean, spread and its mean against the unquantized
    default's, from the recipe results it finds (a configuration without runs is left out)."""
    import lora_init

    monkeypatch.setattr(lora_init, "RUNS", tmp_path)
    for (quantization, init, seed), accuracy in {
        ("none", "default", 0): 0.85, ("none", "default", 1): 0.84,
        ("nf4", "loftq", 0): 0.84, ("nf4", "loftq", 1): 0.83,
    }.items():  # fmt: skip
        result = {"accuracy": accuracy, "options": {"train_seed": seed}, "machine": {"cpu": "a test CPU"}}
        lora_init.result_path(quantization, init, seed).write_text(json.dumps(result))
    text, found = lora_init.table([0, 1])
    rows = text.splitlines()
    assert len(rows) == 4 and not found[("nf4", "eva")]
    assert rows[2] == "| unquantized (fp32) | default | 85.0% | 84.0% | **84.50%** | 1.0 points | +0.00 points |"
    assert rows[3] == "| NF4 | loftq | 84.0% | 83.0% | **83.50%** | 1.0 points | -1.00 points |"


@pytest.mark.slow
def test_lm_loss_quick(tiny_chat_llama, tmp_path):
    import lm_loss

    payload = lm_loss.main(["--quick", "--warm-start", "--model", tiny_chat_llama, "--out", str(tmp_path)])
    every, response = payload["runs"]["every"][0], payload["runs"]["response"][0]
    assert abs(every["loss"] - response["loss"]) < 1e-4  # the same loss from fewer logits
    assert "| logits where the loss reads (default) |" in (tmp_path / "lm_loss-quick.md").read_text()


def test_lora_init_runs_the_legal_recipe_at_its_reduced_budget(tmp_path, monkeypatch):
    """``--recipe legal``: the category task on 1,000 notices for one epoch, with the base, the start and the seed
    asked, its results read from the run's folder and stamped with the machine."""
    from types import SimpleNamespace

    import lora_init

    commands = []

    def fake_run(command, check, cwd):
        commands.append(command)
        folder = Path(command[command.index("--output") + 1])
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"accuracy": 0.8}))

    monkeypatch.setattr(lora_init, "subprocess", SimpleNamespace(run=fake_run))  # machine() keeps the real one
    result = lora_init.run("nf4", "eva", 1, tmp_path, "legal")
    command = " ".join(commands[0])
    assert "recipes/legal.py --task category --train-size 1000 --epochs 1" in command
    assert "--quantization nf4 --lora-init eva --train-seed 1" in command
    assert result["accuracy"] == 0.8 and result["machine"]["cpu"]
    assert lora_init.result_path("nf4", "eva", 1, "legal").name == "legal-category-nf4-eva-seed1.json"


def test_lora_init_reads_every_score_of_the_assistant(tmp_path, monkeypatch):
    """``--recipe assistant``: the recipe without its zero-shot answers, and a table row per score it reports
    (SPDX id, category, follow-ups, whole conversation), each against the unquantized default's same score."""
    from types import SimpleNamespace

    import lora_init

    def fake_run(command, check, cwd):
        assert "recipes/legal_assistant.py --no-zero-shot --quantization nf4 --lora-init eva" in " ".join(command)
        folder = Path(command[command.index("--output") + 1])
        folder.mkdir(parents=True)
        scores = {"spdx_exact_match": 0.5, "category_accuracy": 0.8, "follow_up_accuracy": 0.75}
        (folder / "results.json").write_text(json.dumps({"fine_tuned": {**scores, "conversation_all_right": 0.4}}))

    monkeypatch.setattr(lora_init, "subprocess", SimpleNamespace(run=fake_run))
    monkeypatch.setattr(lora_init, "RUNS", tmp_path)
    eva = lora_init.run("nf4", "eva", 0, tmp_path / "runs", "assistant")
    lora_init.result_path("nf4", "eva", 0, "assistant").write_text(json.dumps(eva))
    baseline = {"fine_tuned": {"spdx_exact_match": 0.525, "category_accuracy": 0.8, "follow_up_accuracy": 0.8}}
    baseline["fine_tuned"]["conversation_all_right"] = 0.45
    lora_init.result_path("none", "default", 0, "assistant").write_text(json.dumps(baseline))
    rows = lora_init.table([0], "assistant")[0].splitlines()
    assert rows[0] == "| base | LoRA start | score | seed 0 | mean | spread | vs unquantized default |"
    assert len(rows) == 2 + 2 * 4
    assert rows[6] == "| NF4 | eva | SPDX id exact | 50.0% | **50.00%** | - | -2.50 points |"
    assert rows[9] == "| NF4 | eva | whole conversation | 40.0% | **40.00%** | - | -5.00 points |"
