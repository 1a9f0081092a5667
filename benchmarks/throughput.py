"""Training throughput at a fixed shape: ours vs the plain PEFT + Trainer script, same run.

    python benchmarks/throughput.py                      # batch 16 x 512 tokens, 30 steps, 2 repetitions
    python benchmarks/throughput.py --seq-len 64 --steps 3 --repeats 1 --model PATH   # a dry run

Every row is exactly ``--seq-len`` tokens (review snippets joined, then truncated), so padding plays no
part: this measures the step itself. Both sides train SmolLM2-135M in NF4 with LoRA r=8 alpha 16
dropout 0.05 on all linear layers and a new classification head, one epoch of ``steps x batch`` rows,
each **at its own defaults** (ours: ``adapters.train``; the baseline: ``prepare_model_for_kbit_training``
+ ``get_peft_model`` + ``Trainer``, as the PEFT docs write it), alternating in fresh processes.

Reported per side (medians): tokens/s over the whole ``train`` call, seconds per step, peak memory
(``torch.cuda.max_memory_allocated`` on a GPU, peak RSS on CPU) and model FLOPs utilisation,
MFU = FLOPs per second / the GPU's dense bf16 peak, with FLOPs per token = 4 N + 12 L s d: a frozen
base costs 2 N forward and 2 N backward (input gradients only, no weight gradients), N the
non-embedding parameters; attention scores and their weighted sum cost 4 L s d forward and twice
that backward (L layers, s tokens, d hidden size; causal masking not discounted).
Writes results/throughput[-NAME].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_warm_start  # noqa: E402

LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
SIDES = ["ours", "baseline", "ours-compiled"]
LR = 2e-4
# dense bf16 peak (TFLOP/s) by the GPU's name, from the vendors' datasheets
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def long_texts(rows: int, seq_len: int, tokenizer) -> list[dict]:
    """``rows`` texts of at least ``seq_len`` tokens each (snippets joined), labelled by the first snippet."""
    from adapters.data.sources import rotten_tomatoes

    snippets = rotten_tomatoes()
    out, i = [], 0
    for _ in range(rows):
        parts, label = [], snippets[i % len(snippets)]["label"]
        while len(tokenizer(" ".join(parts))["input_ids"]) < seq_len + 1:
            parts.append(snippets[i % len(snippets)]["text"])
            i += 1
        out.append({"text": " ".join(parts), "label": label})
    return out


def flops_per_token(config, seq_len: int) -> float:
    d, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * d)
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = d // heads
    per_layer = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * inter
    n = layers * per_layer
    return 4 * n + 12 * layers * seq_len * d


def _peak_mb() -> float:
    from common import peak_memory_mb

    return peak_memory_mb()


class StepClock:
    """The time of every logged step (``log_every=1``): the first step's excess over the median of the
    others is what compiling cost."""

    def __init__(self):
        self.times = [time.perf_counter()]

    def on_log(self, config, state, control, logs):
        self.times.append(time.perf_counter())

    def first_step_excess(self) -> float | None:
        steps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return steps[0] - statistics.median(steps[1:]) if len(steps) > 2 else None


def run_ours(model_name: str, rows: int, seq_len: int, batch: int, compile: bool = False) -> dict:
    import adapters

    model = adapters.adapt(
        model_name,
        adapter=adapters.LoRA(**LORA),
        head=adapters.Classification(labels=["negative", "positive"]),
        quantization="nf4",
        max_length=seq_len,
    )
    data = long_texts(rows, seq_len, model.tokenizer)
    clock = StepClock()
    config = adapters.TrainConfig(epochs=1, lr=LR, batch_size=batch, progress=False, compile=compile, log_every=1)
    started = time.perf_counter()
    metrics = adapters.train(model, data, None, config, callbacks=[clock])
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "compile_seconds": clock.first_step_excess() if compile else None,
        "steps": metrics["steps"],
        "tokens": rows * seq_len,
        "flops_per_token": flops_per_token(model.backbone.config, seq_len),
    }


def run_baseline(model_name: str, rows: int, seq_len: int, batch: int) -> dict:
    """The hand-written PEFT + Trainer script, as its docs show it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from adapters.backbone.packaged import PACKAGED_MODELS, resolve_packaged

    path = str(resolve_packaged(model_name)) if model_name in PACKAGED_MODELS else model_name
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = long_texts(rows, seq_len, tokenizer)
    labels = {"negative": 0, "positive": 1}
    ds = Dataset.from_list([{"text": r["text"], "label": labels[r["label"]]} for r in data]).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=seq_len), batched=True, remove_columns=["text"]
    )
    cuda = torch.cuda.is_available()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=2,
        quantization_config=bnb,
        device_map={"": 0 if cuda else "cpu"},
        dtype=torch.bfloat16 if cuda else torch.float32,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="SEQ_CLS",
        ),
    )
    args = TrainingArguments(
        output_dir="/tmp/throughput-baseline",
        per_device_train_batch_size=batch,
        learning_rate=LR,
        num_train_epochs=1,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not cuda,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "steps": result.global_step,
        "tokens": rows * seq_len,
        "flops_per_token": flops_per_token(model.get_base_model().config, seq_len),
    }


def summarise(runs: dict, device_name: str | None) -> dict:
    per_token = runs["ours"][0]["flops_per_token"]
    peak = peak_tflops(device_name)
    summary = {"flops_per_token": per_token, "peak_tflops": peak}
    for side, results in runs.items():
        tps = statistics.median(r["tokens"] / r["seconds"] for r in results)
        summary[side] = {
            "tokens_per_second": tps,
            "seconds_per_step": statistics.median(r["seconds"] / r["steps"] for r in results),
            "peak_mb": statistics.median(r["peak_mb"] for r in results),
            "mfu": tps * per_token / (peak * 1e12) if peak else None,
        }
        compiles = [r["compile_seconds"] for r in results if r.get("compile_seconds") is not None]
        summary[side]["compile_seconds"] = statistics.median(compiles) if compiles else None
    summary["speedup"] = summary["ours"]["tokens_per_second"] / summary["baseline"]["tokens_per_second"]
    if "ours-compiled" in runs:
        compiled = summary["ours-compiled"]["tokens_per_second"]
        summary["compiled_speedup"] = compiled / summary["baseline"]["tokens_per_second"]
    summary["memory_ratio"] = summary["ours"]["peak_mb"] / summary["baseline"]["peak_mb"]
    return summary


def table(summary: dict, args) -> str:
    def mfu(s):
        return f"{100 * s['mfu']:.2f}%" if s["mfu"] is not None else "n/a"

    lines = [
        "| side | tokens/s | s/step | peak memory (MB) | MFU | compile (s) |",
        "|---|---|---|---|---|---|",
    ]
    for side in [s for s in SIDES if s in summary]:
        s = summary[side]
        compiled = f"{s['compile_seconds']:.1f}" if s.get("compile_seconds") is not None else ""
        lines.append(
            f"| {side} | {s['tokens_per_second']:,.0f} | {s['seconds_per_step']:.4f} | {s['peak_mb']:,.0f} | "
            f"{mfu(s)} | {compiled} |"
        )
    extra = (
        f", compiled/baseline tokens/s x{summary['compiled_speedup']:.2f} (the whole call, compile included)"
        if "compiled_speedup" in summary
        else ""
    )
    return "\n".join(lines) + (
        f"\n\nRatios ours/baseline: tokens/s x{summary['speedup']:.2f}, peak memory x{summary['memory_ratio']:.2f}"
        f"{extra}. "
        f"`{args.model}` NF4, LoRA r=8 all-linear, batch {args.batch} x {args.seq_len} tokens (no padding), "
        f"{args.steps} steps, {args.repeats} repetitions alternating in fresh processes (medians). "
        f"FLOPs per token 4N + 12Lsd = {summary['flops_per_token'] / 1e9:.2f} GFLOP; peak "
        f"{summary['peak_tflops'] or 'unknown'} TFLOP/s dense bf16."
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--name", default="", help="suffix of the result files")
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    p.add_argument("--compile", action="store_true", help="a third side: ours with TrainConfig(compile=True)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one run
    add_warm_start(p)
    args = p.parse_args(argv)
    if args.side:
        shape = (args.model, args.steps * args.batch, args.seq_len, args.batch)
        if args.side == "baseline":
            result = run_baseline(*shape)
        else:
            result = run_ours(*shape, compile=args.side == "ours-compiled")
        print(json.dumps({**result, "peak_mb": _peak_mb()}))
        return result
    from common import machine, run_child, write_results

    sides = SIDES if args.compile else SIDES[:2]
    runs: dict[str, list] = {side: [] for side in sides}
    child = [
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
    ]
    for i in range(args.repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:
            runs[side].append(run_child(__file__, ["--side", side, *child], timeout=1800, warm=args.warm_start))
            r = runs[side][-1]
            print(
                f"repeat {i + 1} {side}: {r['tokens'] / r['seconds']:,.0f} tokens/s, {r['peak_mb']:,.0f} MB", flush=True
            )
    stamp = machine()
    summary = summarise(runs, stamp["gpu"])
    text = table(summary, args)
    payload = {"machine": stamp, "settings": vars(args), "runs": runs, "summary": summary}
    write_results("throughput" + (f"-{args.name}" if args.name else ""), payload, text, args.out)
    print(text)
    return payload


if __name__ == "__main__":
    main()
