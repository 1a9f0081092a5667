"""How close is ``adapters.estimate_memory`` to what training really allocates?

For each cell of a grid (model, quantization, method, batch, sequence length, checkpointing) it
prints the estimate, then measures two real training steps (forward, backward, optimizer step)
in a fresh subprocess, so cells never share an allocator:

* on a GPU: ``torch.cuda.max_memory_allocated`` over the steps;
* on CPU: the peak of live tensor memory, from the allocator's own records (PyTorch profiler with
  ``profile_memory=True``, started before the model is loaded, so weights, quantization
  constants, optimizer states and every temporary are in it; unquantized weights, which
  safetensors maps from disk, are copied into allocated memory first; RSS would add the Python
  heap, libraries and allocator caching, which no estimate of tensors can know).

and reports the error (estimate / measured - 1) per cell. The goal: within 15% on CPU, 10% on
a GPU (against ``tensors``, the estimate without the CUDA context).

    python benchmarks/memory_accuracy.py            # full grid (~15 minutes on 2 CPU cores)
    python benchmarks/memory_accuracy.py --quick    # 4 cells, for CI and a first look
    python benchmarks/memory_accuracy.py --grid scale   # the 1B shape (random weights, shapes.py)
    python benchmarks/memory_accuracy.py --grid fsdp    # per-rank memory under 2 processes, DDP vs FSDP
    python benchmarks/memory_accuracy.py --grid fsdp-scale  # the same at the 1B shape

A cell with ``parallel`` ("ddp" or "fsdp") runs under ``torchrun --nproc-per-node 2`` (gloo on CPU): the model
is wrapped in DDP or sharded by ``sharding/fsdp.py`` after loading, and the peak is that of the training
steps on each rank (the larger of the two), against ``estimate_memory(processes=2, fsdp=...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_warm_start, fresh_process, machine, write_results  # noqa: E402

MIB = 2**20


def cell_objects(cell: dict):
    import adapters

    adapter = {
        "lora": adapters.LoRA(r=8),
        "dora": adapters.LoRA(r=8, dora=True),
        "bottleneck": adapters.Bottleneck(placement="pfeiffer"),
        "head": None,
    }[cell["method"]]
    return adapter, adapters.Classification(labels=["a", "b"])


def estimate(cell: dict, device: str) -> dict:
    from adapters import estimate_memory

    adapter, head = cell_objects(cell)
    est = estimate_memory(
        cell["model"],
        adapter=adapter,
        head=head,
        quantization=cell["quantization"],
        batch_size=cell["batch"],
        seq_len=cell["seq_len"],
        gradient_checkpointing=cell["checkpointing"],
        optimizer=cell.get("optimizer", "adamw"),
        device=device,
        processes=2 if cell.get("parallel") else 1,
        fsdp=cell.get("parallel") == "fsdp",
    )
    return est.to_dict()


def measure(cell: dict) -> dict:
    """Two training steps of ``cell``; peak allocated bytes (run in its own process)."""
    import torch

    import adapters
    from adapters.backbone.precision import resolve_mixed_precision
    from adapters.config.training import TrainConfig
    from adapters.training.optim import build_optimizer

    adapter, head = cell_objects(cell)
    gpu = torch.cuda.is_available()
    b, s = cell["batch"], cell["seq_len"]

    frozen: dict[str, int] = {}

    def run():
        model = adapters.adapt(
            cell["model"], adapter=adapter, head=head, quantization=cell["quantization"], max_length=s
        )
        # unquantized weights are read by mmap from safetensors: pages of a file, not allocations,
        # so the allocator never sees them; copy them into allocated memory, as a GPU load would
        for t in [*model.parameters(), *model.buffers()]:
            if type(t).__name__ not in ("Params4bit", "Int8Params"):
                t.data = t.data.clone()
        if cell["checkpointing"]:  # as train() does
            from adapters.backbone.loading import enable_checkpointing

            enable_checkpointing(model.backbone)
        optimizer = build_optimizer(model, TrainConfig(optimizer=cell.get("optimizer", "adamw")))
        if cell.get("parallel"):
            from adapters.backbone.sharded import local_bytes

            model, optimizer = _parallel(model, cell["parallel"], cell.get("optimizer", "adamw"))
            frozen["frozen_bytes_here"], frozen["frozen_bytes"] = local_bytes(_unwrapped(model))
        generator = torch.Generator().manual_seed(0)
        vocab = _unwrapped(model).backbone.config.vocab_size
        device = _unwrapped(model).device
        ids = torch.randint(min(10, vocab - 1), min(1000, vocab), (b, s), generator=generator).to(device)
        mask = torch.ones(b, s, dtype=torch.long, device=device)
        mask[-1, : s // 4] = 0  # one padded row, as real batches have: the model builds its padding mask
        labels = torch.randint(0, 2, (b,), generator=generator).to(device)
        model.train()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # as train() runs it: under bf16 autocast on GPUs (TrainConfig(mixed_precision="auto"))
        precision = resolve_mixed_precision(cell.get("mixed_precision", "auto"), device.type)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.profiler.record_function("train_steps"):
            for _ in range(2):
                with autocast:
                    out = model(input_ids=ids, attention_mask=mask, labels=labels)
                out["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del out

    if gpu:
        run()
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "how": "torch.cuda.max_memory_allocated", **frozen}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    start = next(e.start_ns() for e in events if e.name() == "train_steps")
    live = peak = 0
    at_start = None
    for e in events:
        if e.name() != "[memory]" or e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        if at_start is None and e.start_ns() >= start:
            at_start = live
        live += e.nbytes()
        if e.start_ns() >= start:
            peak = max(peak, live)
    return {"peak_bytes": peak, "bytes_before_training": at_start, "how": "CPU allocator records (profiler)", **frozen}


def _parallel(model, kind: str, optimizer_name: str):
    """``model`` in DDP, or sharded by FSDP2 as ``train(fsdp=True)`` shards it (fp32: no cast), and its optimizer."""
    import torch
    import torch.distributed as dist

    from adapters.config.training import TrainConfig
    from adapters.sharding.fsdp import shard
    from adapters.training.optim import build_optimizer

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if kind == "fsdp":
        shard(model, "no", dist.get_world_size())
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, build_optimizer(_unwrapped(model), TrainConfig(optimizer=optimizer_name))


def _unwrapped(model):
    return getattr(model, "module", model)


def _measured(cell: dict, warm: bool) -> tuple[int, str, str]:
    """One cell measured in fresh processes (2 under torchrun for a parallel cell): exit code, stdout, stderr."""
    args = ["--measure", json.dumps(cell)]
    if not cell.get("parallel"):
        return fresh_process(__file__, args, dict(os.environ), timeout=None, warm=warm)  # a big cell takes long
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, __file__, *args], capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def grid(quick: bool, kind: str = "cpu") -> list[dict]:
    def cell(**kw):
        base = {
            "model": "smollm2-135m",
            "quantization": "nf4",
            "method": "lora",
            "batch": 4,
            "seq_len": 128,
            "checkpointing": False,
        }
        return {**base, **kw}

    if kind == "gpu":  # nf4/int8, LoRA/bottleneck, 128-2048 tokens, with and without checkpointing
        return [
            cell(batch=8),
            cell(batch=8, seq_len=512),
            cell(seq_len=2048),
            cell(seq_len=2048, checkpointing=True),
            cell(batch=16, seq_len=1024, checkpointing=True),
            cell(method="bottleneck", batch=8, seq_len=512),
            cell(method="bottleneck", seq_len=2048, checkpointing=True),
            cell(quantization="int8", batch=8, seq_len=512),
            cell(quantization="int8", seq_len=1024, checkpointing=True),
            cell(quantization="int8", method="bottleneck", batch=8, seq_len=256),
        ]
    if kind == "scale":  # the 1B shape: nf4/int8, LoRA/bottleneck, with and without checkpointing
        from shapes import write

        folder = str(write("llama-3.2-1b"))
        return [
            cell(model=folder, quantization=q, method=m, batch=2, seq_len=128, checkpointing=c)
            for q in ("nf4", "int8")
            for m in ("lora", "bottleneck")
            for c in (False, True)
        ]
    if kind == "fsdp-scale":  # the same at the 1B shape, where the frozen base dominates
        from shapes import write

        folder = str(write("llama-3.2-1b"))
        return [cell(model=folder, batch=1, seq_len=128, parallel=p) for p in ("ddp", "fsdp")]
    if kind == "fsdp":  # per rank, 2 processes: DDP (whole weights) vs FSDP (1/2 of them)
        return [
            cell(quantization=q, method=m, parallel=p)
            for q, m in (("nf4", "lora"), ("nf4", "bottleneck"), (None, "lora"))
            for p in ("ddp", "fsdp")
        ]
    if quick:
        return [cell(), cell(quantization=None), cell(method="bottleneck", batch=8), cell(checkpointing=True, batch=8)]
    cells = []
    for quantization in ("nf4", "int8", None):
        for method in ("lora", "bottleneck", "head"):
            cells.append(cell(quantization=quantization, method=method))
    cells += [cell(batch=b, seq_len=s, checkpointing=c) for b, s in ((2, 512), (8, 256)) for c in (False, True)]
    cells += [
        cell(method="dora"),
        cell(optimizer="adamw_8bit"),
        cell(checkpointing=True),
        cell(model="minilm-l6", batch=16),
        cell(model="minilm-l6", quantization=None, batch=16),
        cell(model="minilm-l6", method="bottleneck", batch=16, seq_len=256),
    ]
    return cells


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", help="run every cell on this model instead (a packaged name or a folder)")
    p.add_argument(
        "--grid",
        choices=["cpu", "gpu", "scale", "fsdp", "fsdp-scale"],
        default="cpu",
        help="the cells: CPU-sized, GPU-sized (8-16 x 128-2048), the 1B shape, or 2-process DDP vs FSDP",
    )
    p.add_argument("--max-seq-len", type=int, help="clamp every cell's length (a dry run on a tiny model)")
    p.add_argument("--name", help="result file name (default: memory_accuracy[-quick|-gpu])")
    p.add_argument("--limit", type=int, help="only the first N cells (a dry run)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one cell as JSON, in a subprocess
    add_warm_start(p)
    args = p.parse_args(argv)
    if args.measure:
        print("RESULT " + json.dumps(measure(json.loads(args.measure))))
        return {}
    import torch
    from tqdm.auto import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    cells = [{**c, "model": args.model} if args.model else c for c in grid(args.quick, args.grid)]
    cells = cells[: args.limit] if args.limit else cells
    if args.max_seq_len:
        cells = [{**c, "seq_len": min(c["seq_len"], args.max_seq_len)} for c in cells]
    for cell in tqdm(cells, desc="cells"):
        est = estimate(cell, device)
        returncode, stdout, stderr = _measured(cell, args.warm_start)
        lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        if returncode != 0 or not lines:
            raise RuntimeError(f"measuring {cell} failed:\n{stderr[-3000:]}")
        got = max((json.loads(x[7:]) for x in lines), key=lambda r: r["peak_bytes"])  # the fuller rank
        error = est["tensors"] / got["peak_bytes"] - 1
        rows.append(
            {
                **cell,
                "quantization": cell["quantization"] or "none",
                "estimate_mib": est["tensors"] / MIB,
                "measured_mib": got["peak_bytes"] / MIB,
                "error": error,
                "estimate_parts_mib": {
                    k: est[k] / MIB
                    for k in (
                        "base_quantized",
                        "base_unquantized",
                        "trainable",
                        "gradients",
                        "optimizer",
                        "activations",
                        "transient",
                    )
                },
                "measured_before_training_mib": (got.get("bytes_before_training") or 0) / MIB,
                **({"frozen_mib_per_rank": got["frozen_bytes_here"] / MIB} if "frozen_bytes_here" in got else {}),
            }
        )
        tqdm.write(
            f"{cell['model']:>13} {rows[-1]['quantization']:>5} {cell['method']:>10} b={cell['batch']:<2} "
            f"s={cell['seq_len']:<4} ckpt={int(cell['checkpointing'])} {cell.get('optimizer', 'adamw'):>10}: "
            f"estimate {rows[-1]['estimate_mib']:8.1f} MiB, measured {rows[-1]['measured_mib']:8.1f} MiB, "
            f"error {100 * error:+.1f}%"
        )
    errors = [abs(r["error"]) for r in rows]
    goal = 0.10 if device == "cuda" else 0.15
    summary = {
        "cells": len(rows),
        "max_abs_error": max(errors),
        "mean_abs_error": sum(errors) / len(errors),
        "within_goal": sum(e <= goal for e in errors),
        "goal": goal,
        "measured_by": got["how"],
    }
    header = [
        "model",
        "quantization",
        "method",
        "batch",
        "seq_len",
        "checkpointing",
        "optimizer",
        "processes",
        "estimate MiB",
        "measured MiB",
        "error",
    ]
    table = [
        [
            Path(r["model"]).name,
            r["quantization"],
            r["method"],
            r["batch"],
            r["seq_len"],
            r["checkpointing"],
            r.get("optimizer", "adamw"),
            f"2, {r['parallel'].upper()}" if r.get("parallel") else "1",
            f"{r['estimate_mib']:.1f}",
            f"{r['measured_mib']:.1f}",
            f"{100 * r['error']:+.1f}%",
        ]
        for r in rows
    ]
    notes = (
        f"Estimate (`tensors`: everything but the CUDA context) vs measured peak over two training steps, "
        f"measured by {got['how']}. {summary['within_goal']} of {len(rows)} cells within "
        f"{100 * goal:.0f}%; max |error| {100 * summary['max_abs_error']:.1f}%, "
        f"mean {100 * summary['mean_abs_error']:.1f}%."
    )
    result = {"machine": machine(), "summary": summary, "rows": rows}
    text = (
        "\n".join(
            ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(x) for x in row) + " |" for row in table]
        )
        + "\n\n"
        + notes
    )
    name = args.name or "memory_accuracy" + ("-quick" if args.quick else "" if args.grid == "cpu" else f"-{args.grid}")
    path = write_results(name, result, text, Path(args.out))
    _plot(result, path.with_suffix(".png"))
    print(text)
    return result


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter([r["measured_mib"] for r in rows], [r["estimate_mib"] for r in rows])
    top = max(max(r["measured_mib"], r["estimate_mib"]) for r in rows) * 1.1
    ax.plot([0, top], [0, top], "k--", lw=1, label="exact")
    ax.fill_between([0, top], [0, 0.85 * top], [0, 1.15 * top], alpha=0.15, label="±15%")
    ax.set_xlabel("measured peak (MiB)")
    ax.set_ylabel("estimate (MiB)")
    ax.set_title("estimate_memory vs measured training peak")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
