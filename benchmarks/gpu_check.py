"""The GPU path, checked and measured in one unattended run (under 8 minutes on one H100 or H200).

    make gpu-check                              # python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run    # the same code paths on the CPU, tiny model and sizes

GPU time is rare and short, so this is written to be trusted before a GPU is in hand: a fast test
runs the dry run, and every part runs in its own process under its own timeout (all of them under
``--budget`` seconds), so one failure or hang costs one part, not the run. A dry run on a CPU forks its parts
from a process that has the libraries imported (``zygote.py``: 122 s to 80 s on a 2-core AVX2 EPYC). Parts:

1. **correctness**: ``pytest -m gpu`` (``tests/test_gpu.py``): nf4/fp4/int8 bases on CUDA in bf16,
   training lowers the loss for every head kind with LoRA and bottleneck adapters, save -> load gives
   the same logits, a CPU artifact predicts the same labels on the GPU and back, 8-bit optimizers,
   checkpointing gives the same gradients, ``auto_batch_size`` fits and backs off on out-of-memory;
2. **memory**: ``memory_accuracy.py --grid gpu``: ``estimate_memory`` vs ``torch.cuda.max_memory_allocated``
   on 10 cells (nf4/int8, LoRA/bottleneck, 128-2048 tokens, with and without checkpointing); goal 10%;
3. **throughput**: ``throughput.py``: batch 16 x 512, ours vs PEFT + Trainer in the same run: tokens/s,
   step time, peak memory, MFU; goal x1.3 tokens/s and x0.75 memory; and a third side, ours with regional
   ``torch.compile`` (``TrainConfig(compile=True)``), with its compile time;
4. **recipe**: ``recipes/sentiment.py`` at its default budget: time and accuracy;
5. **fsdp**: ``fsdp_check.py``: one FSDP2 training step (world size 1, nccl, gathered in bf16) leaves every
   packed NF4 byte unchanged (bitsandbytes#1945); **shard-load**: ``adapt(..., fsdp=True)`` on every visible
   GPU (``torchrun --nproc-per-node`` = the GPU count): each rank's NF4 bytes equal its slice of a whole load;
6. **scale**: the Llama-3.1-8B shape (random weights, ``shapes.py``, written once to ``--shapes-dir``):
   ``throughput.py`` at 16 x 512, ours vs PEFT + Trainer (tokens/s, step time, peak memory, MFU; targets
   MFU >= 20%, x1.3 tokens/s, x0.75 memory) and ``estimate_memory`` on two cells (goal 10%).

Parts 5 and 6 are new since the last GPU run; 6 needs about 7 minutes and 17 GB of disk, so a session with
little device time runs ``--parts correctness,fsdp,scale --budget 840`` first.

After each part, ``<out>/gpu-check.{json,md}`` is rewritten with everything finished so far (device,
driver, CUDA, library versions), so a killed run still leaves its results. Without CUDA (and without
``--dry-run``) it prints "no CUDA device: GPU check skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import forking_is_safe, zygote  # noqa: E402

# seconds per part: what each took on an H200 (memory: 10 cells at about 21 s each), with room;
# the total --budget caps them all
TIMEOUTS = {
    "correctness": 180, "memory": 240, "throughput": 320, "recipe": 150, "fsdp": 120, "shard-load": 180, "scale": 480,
}  # fmt: skip


def device_info() -> dict:
    import torch
    from common import machine

    info = machine()
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def run_part(command: list[str], timeout: float, env: dict | None = None, warm: bool = False) -> dict:
    """Run one part in its own process (own session, so a timeout kills its children too). ``warm``: forked from a
    zygote (``zygote.py``), as a dry run on a CPU does, where each part's 5-7 s of imports is most of it."""
    started = time.perf_counter()
    environ = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    # a part with an environment of its own would need a zygote of its own: no saving for one process
    run = _forked if warm and not env else _started
    status, output = run(command, max(timeout, 1), {**environ, **(env or {})})
    return {"status": status, "seconds": round(time.perf_counter() - started, 1), "output_tail": output[-4000:]}


def _started(command: list[str], timeout: float, env: dict) -> tuple[str, str]:
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return ("passed" if proc.returncode == 0 else "failed"), output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        return "timeout", proc.communicate()[0]


def _forked(command: list[str], timeout: float, env: dict) -> tuple[str, str]:
    """``command`` (``python script ...`` or ``python -m module ...``) forked from a zygote, in a session."""
    module = command[1] == "-m"
    script, args = (command[2], command[3:]) if module else (command[1], command[2:])
    try:
        code, output, _ = zygote(env).run(script, args, timeout, str(ROOT), module=module, session=True, merged=True)
        return ("passed" if code == 0 else "failed"), output
    except subprocess.TimeoutExpired as stop:
        return "timeout", str(stop.output or "")


def correctness(ctx) -> dict:
    junit = ctx.work / "junit.xml"
    select = ["-k", ctx.tests] if ctx.tests else []
    result = run_part(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/test_gpu.py",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            *select,
        ],
        ctx.timeout("correctness"),
        {"QADAPTERS_GPU_DRY_RUN": "1"} if ctx.dry_run else None,
    )
    if junit.exists():
        cases = ET.parse(junit).getroot().iter("testcase")
        tests = {"passed": [], "failed": [], "skipped": []}
        for case in cases:
            name = case.get("name")
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                tests["failed"].append({"test": name, "message": (bad.get("message") or "")[:300]})
            elif case.find("skipped") is not None:
                tests["skipped"].append(name)
            else:
                tests["passed"].append(name)
        result["tests"] = tests
        if result["status"] == "passed" and not tests["passed"]:
            result["status"] = "failed"  # everything skipped: nothing was checked
    return result


def memory(ctx) -> dict:
    cmd = [
        sys.executable,
        "benchmarks/memory_accuracy.py",
        "--grid",
        "gpu",
        "--out",
        str(ctx.out),
        "--name",
        "memory_accuracy-gpu" + ctx.suffix,
    ]
    if ctx.memory_cells:
        cmd += ["--limit", str(ctx.memory_cells)]
    if ctx.dry_run:
        cmd += ["--model", ctx.model, "--limit", "1", "--max-seq-len", "64"]  # one cell: a zygote would not pay
    result = run_part(cmd, ctx.timeout("memory"), warm=ctx.warm)
    path = ctx.out / f"memory_accuracy-gpu{ctx.suffix}.json"
    if result["status"] == "passed" and path.exists():
        data = json.loads(path.read_text())
        result["summary"] = data["summary"]
        result["rows"] = [
            {
                k: r[k]
                for k in (
                    "quantization",
                    "method",
                    "batch",
                    "seq_len",
                    "checkpointing",
                    "estimate_mib",
                    "measured_mib",
                    "error",
                )
            }
            for r in data["rows"]
        ]
    return result


def throughput(ctx) -> dict:
    cmd = [sys.executable, "benchmarks/throughput.py", "--out", str(ctx.out), "--name", "gpu" + ctx.suffix]
    if ctx.dry_run:  # inductor's CPU compile would take most of the dry run: tests/test_compile.py covers it
        cmd += ["--model", ctx.model, "--seq-len", "64", "--batch", "4", "--steps", "2", "--repeats", "1"]
        cmd.append("--warm-start")  # its runs forked from a process with the imports (zygote.py)
    else:  # a third side, ours with regional torch.compile (its compile time reported)
        cmd.append("--compile")
    result = run_part(cmd, ctx.timeout("throughput"), warm=ctx.warm)
    path = ctx.out / f"throughput-gpu{ctx.suffix}.json"
    if result["status"] == "passed" and path.exists():
        data = json.loads(path.read_text())
        result["summary"] = {**data["summary"], **{k: data["settings"][k] for k in ("batch", "seq_len", "repeats")}}
    return result


def recipe(ctx) -> dict:
    output = ctx.work / "sentiment"
    cmd = [sys.executable, "recipes/sentiment.py", "--output", str(output)]
    if ctx.dry_run:
        cmd += ["--model", ctx.model, "--train-size", "32", "--eval-size", "16"]
    result = run_part(cmd, ctx.timeout("recipe"), warm=ctx.warm)
    if result["status"] == "passed":
        result["summary"] = json.loads((output / "results.json").read_text())
    return result


def fsdp(ctx) -> dict:
    name = ctx.suffix
    result = run_part(
        [sys.executable, "benchmarks/fsdp_check.py", "--model", ctx.model, "--out", str(ctx.out), f"--name={name}"],
        ctx.timeout("fsdp"),
        warm=ctx.warm,
    )
    path = ctx.out / f"fsdp-check{name}.json"
    if path.exists():
        result["summary"] = json.loads(path.read_text())
    return result


def shard_load(ctx) -> dict:
    """``adapt(..., fsdp=True)`` on every visible GPU (``torchrun --nproc-per-node`` = the GPU count; 2 CPU
    processes in a dry run): each rank's NF4 bytes and state equal its slice of a whole load on the same
    device, and every rank computes the same logits (``tests/shard_load_worker.py``)."""
    import torch

    ranks = 2 if ctx.dry_run else max(torch.cuda.device_count(), 1)
    out = ctx.work / "shard-load"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd += ["tests/shard_load_worker.py", "--out", str(out), "--case", f"{ctx.model},nf4,bfloat16,classification"]
    out.mkdir(parents=True, exist_ok=True)
    result = run_part(cmd, ctx.timeout("shard-load"), warm=ctx.warm)
    reports = [json.loads(p.read_text())["cases"][0] for p in sorted(out.glob("rank*.json"))]
    if result["status"] == "passed" and len(reports) == ranks:
        result["summary"] = {
            "ranks": ranks,
            "chunks_equal": all(all(r["same"].values()) for r in reports),
            "same_logits": all(r["logits"] == reports[0]["logits"] for r in reports),
            "report": reports[0]["shard_report"],
        }
        if not (result["summary"]["chunks_equal"] and result["summary"]["same_logits"]):
            result["status"] = "failed"
    return result


def scale(ctx) -> dict:
    """The 8B shape: written once (random weights), then throughput and the memory estimate on it."""
    from shapes import write  # benchmarks/ is on the path (top of this file)

    # a dry run writes the same preset at a tiny width (every code path, a few MB)
    tiny = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    tiny["num_key_value_heads"] = 2
    started = time.perf_counter()
    folder = str(write("llama-3.1-8b", ctx.shapes_dir, progress=False, **(tiny if ctx.dry_run else {})))
    written = round(time.perf_counter() - started, 1)
    # a dry run: tiny sizes, its runs forked from a process with the imports (--warm-start)
    sizes = ["--seq-len", "64", "--batch", "4", "--steps", "2", "--warm-start"] if ctx.dry_run else ["--steps", "10"]
    name = "gpu-8b" + ctx.suffix
    cmd = [sys.executable, "benchmarks/throughput.py", "--model", folder, *sizes, "--repeats", "1"]
    result = run_part([*cmd, "--out", str(ctx.out), "--name", name], ctx.timeout("scale") * 0.7, warm=ctx.warm)
    result["write_seconds"] = written
    path = ctx.out / f"throughput-{name}.json"
    if result["status"] == "passed" and path.exists():
        data = json.loads(path.read_text())
        result["summary"] = {**data["summary"], **{k: data["settings"][k] for k in ("batch", "seq_len", "repeats")}}
    cmd = [sys.executable, "benchmarks/memory_accuracy.py", "--grid", "gpu", "--model", folder, "--limit", "2"]
    memory_name = "memory_accuracy-gpu-8b" + ctx.suffix
    if ctx.dry_run:
        cmd += ["--max-seq-len", "64", "--warm-start"]
    estimate = run_part([*cmd, "--out", str(ctx.out), "--name", memory_name], ctx.timeout("scale"), warm=ctx.warm)
    path = ctx.out / f"{memory_name}.json"
    if estimate["status"] == "passed" and path.exists():
        result["memory"] = json.loads(path.read_text())["summary"]
    if estimate["status"] != "passed":
        result["status"] = estimate["status"]
    return result


PARTS = {
    "correctness": correctness,
    "fsdp": fsdp,
    "shard-load": shard_load,
    "memory": memory,
    "throughput": throughput,
    "scale": scale,
    "recipe": recipe,
}


class Context:
    def __init__(self, args, work: Path):
        self.dry_run, self.model, self.work = args.dry_run, args.model, work
        self.tests, self.memory_cells = args.tests, args.memory_cells
        self.shapes_dir = Path(args.shapes_dir) if args.shapes_dir else (work / "shapes" if args.dry_run else None)
        self.out = Path(args.out)
        self.suffix = "-dry-run" if args.dry_run else ""
        self.warm = args.dry_run and forking_is_safe()  # parts forked from a zygote (run_part)
        self.deadline = time.monotonic() + (args.budget if not args.dry_run else max(args.budget, 2400))

    def timeout(self, part: str) -> float:
        # the per-part limits are sized for a GPU; a dry run on a busy 2-core CPU may take longer
        limit = TIMEOUTS[part] * (4 if self.dry_run else 1)
        return min(limit, self.deadline - time.monotonic())


def report(results: dict) -> str:
    d = results["device"]
    lines = [
        f"GPU check on **{d.get('gpu') or 'CPU (dry run)'}**"
        + (
            f" ({d.get('gpu_memory_gib')} GiB, compute capability {d.get('capability')}), driver {d.get('driver')}, "
            f"CUDA {d.get('cuda')}"
            if d.get("gpu")
            else ""
        )
        + f"; torch {d['torch']}, transformers {d['transformers']}, peft {d['peft']}, bitsandbytes "
        f"{d['bitsandbytes']}, accelerate {d['accelerate']}; {d['date']}.",
        "",
        "| part | status | seconds | result |",
        "|---|---|---|---|",
    ]
    for name in PARTS:
        part = results["parts"].get(name)
        if part is None:
            lines.append(f"| {name} | not run | | |")
            continue
        lines.append(f"| {name} | {part['status']} | {part['seconds']} | {_headline(name, part)} |")
    mem = results["parts"].get("memory", {}).get("rows")
    if mem:
        lines += [
            "",
            "Memory estimate vs `torch.cuda.max_memory_allocated` (two training steps):",
            "",
            "| quantization | method | batch | length | checkpointing | estimate MiB | measured MiB | error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['quantization']} | {r['method']} | {r['batch']} | {r['seq_len']} | {r['checkpointing']} | "
            f"{r['estimate_mib']:.0f} | {r['measured_mib']:.0f} | {100 * r['error']:+.1f}% |"
            for r in mem
        ]
    thr = results["parts"].get("throughput", {}).get("summary")
    if thr:
        lines += [
            "",
            f"Throughput, batch {thr['batch']} x {thr['seq_len']} tokens (medians of {thr['repeats']}):",
            "",
            "| side | tokens/s | s/step | peak MB | MFU |",
            "|---|---|---|---|---|",
        ]
        for side in ("ours", "baseline"):
            s = thr[side]
            mfu = f"{100 * s['mfu']:.2f}%" if s.get("mfu") is not None else "n/a"
            lines.append(
                f"| {side} | {s['tokens_per_second']:,.0f} | {s['seconds_per_step']:.4f} "
                f"| {s['peak_mb']:,.0f} | {mfu} |"
            )
    failed = results["parts"].get("correctness", {}).get("tests", {}).get("failed")
    if failed:
        lines += ["", "Failed tests:", ""] + [f"- `{f['test']}`: {f['message']}" for f in failed]
    return "\n".join(lines) + "\n"


def _headline(name: str, part: dict) -> str:
    if name == "correctness" and "tests" in part:
        t = part["tests"]
        return f"{len(t['passed'])} passed, {len(t['failed'])} failed, {len(t['skipped'])} skipped"
    s = part.get("summary")
    if not s:
        return (
            part["output_tail"].strip().splitlines()[-1][:200].replace("|", "/") if part["output_tail"].strip() else ""
        )
    if name == "memory":
        return (
            f"{s['within_goal']}/{s['cells']} cells within {100 * s['goal']:.0f}%, max abs error "
            f"{100 * s['max_abs_error']:.1f}%, mean {100 * s['mean_abs_error']:.1f}%"
        )
    if name == "fsdp":
        return f"NF4 bytes unchanged after a bf16 FSDP2 step: {s['nf4_bytes_unchanged']}; loss {s['loss']:.4f}"
    if name == "shard-load":
        return (
            f"sharded load on {s['ranks']} ranks: every chunk equal to the whole load's: {s['chunks_equal']}; "
            f"same logits on every rank: {s['same_logits']}"
        )
    if name == "scale":
        memory = part.get("memory") or {}
        within = f"; estimate {memory.get('within_goal')}/{memory.get('cells')} within 10%" if memory else ""
        mfu = s["ours"].get("mfu")
        mfu_text = f", MFU {100 * mfu:.1f}%" if mfu is not None else ""
        return (
            f"8B shape (random weights): ours {s['ours']['tokens_per_second']:,.0f} vs baseline "
            f"{s['baseline']['tokens_per_second']:,.0f} tokens/s (x{s['speedup']:.2f}), peak memory "
            f"x{s['memory_ratio']:.2f}{mfu_text}{within}"
        )
    if name == "throughput":
        return (
            f"ours {s['ours']['tokens_per_second']:,.0f} vs baseline {s['baseline']['tokens_per_second']:,.0f} "
            f"tokens/s (x{s['speedup']:.2f}); peak memory x{s['memory_ratio']:.2f}"
        )
    return (
        f"accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}, train {s['train_seconds']:.0f} s, "
        f"total {s['total_seconds']:.0f} s"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="run every part on the CPU with a tiny model and sizes")
    p.add_argument("--model", help="the model (default: smollm2-135m; a tiny random Llama in a dry run)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--tests", help="correctness: only the tests matching this pytest -k expression (a re-run)")
    p.add_argument("--memory-cells", type=int, help="memory: only the first N cells of the grid (a re-run)")
    p.add_argument("--budget", type=float, default=470, help="seconds for all parts together")
    p.add_argument("--shapes-dir", help="scale: where the 8B shape is written (default ~/.cache/qadapters/shapes)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device: GPU check skipped")
        return 0
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if args.dry_run and not args.model:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import build_tiny

            args.model = build_tiny("llama", work / "tiny-llama")
        args.model = args.model or "smollm2-135m"
        ctx = Context(args, work)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        results = {"device": device_info(), "dry_run": args.dry_run, "model": args.model, "parts": {}}
        name = "gpu-check" + ctx.suffix
        for part in parts:
            if ctx.timeout(part) < 5:
                results["parts"][part] = {"status": "no time left", "seconds": 0, "output_tail": ""}
            else:
                print(f"[gpu-check] {part}: up to {ctx.timeout(part):.0f} s", flush=True)
                results["parts"][part] = PARTS[part](ctx)
                print(
                    f"[gpu-check] {part}: {results['parts'][part]['status']} in "
                    f"{results['parts'][part]['seconds']} s: {_headline(part, results['parts'][part])}",
                    flush=True,
                )
            (Path(args.out) / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
            (Path(args.out) / f"{name}.md").write_text(report(results))
    print(report(results))
    return 0 if all(r["status"] == "passed" for r in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
