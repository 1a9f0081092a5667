"""Where LoRA starts, measured on the sentiment recipe: the unquantized base with peft's default start against
NF4 with each start (default, LoftQ, EVA) and the unquantized base with PiSSA, over training seeds (the split
kept, so the spread is run-to-run), in one table with the CPU named (#46).

    python benchmarks/lora_init.py                 # every missing run (about 5 minutes each on 2 cores), then the table
    python benchmarks/lora_init.py --table-only    # the table from the runs already in recipes/results

Each run is ``recipes/sentiment.py --quantization Q --lora-init I --train-seed S`` in a fresh process, its
results saved as ``recipes/results/sentiment-{Q}-{I}-seed{S}.json`` with the machine that ran it; a run already
there is reused. The table gives each configuration's mean and spread (max - min) over seeds, and its mean
against the unquantized default's: a start "wins" only by more than the seeds' spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "recipes" / "results"
CONFIGS = [("none", "default"), ("nf4", "default"), ("nf4", "loftq"), ("nf4", "eva"), ("none", "pissa")]


def result_path(quantization: str, init: str, seed: int) -> Path:
    return RUNS / f"sentiment-{quantization}-{init}-seed{seed}.json"


def run(quantization: str, init: str, seed: int, output: Path) -> dict:
    """One recipe run in a fresh process; its results with the machine stamped in."""
    folder = output / f"{quantization}-{init}-seed{seed}"
    command = [sys.executable, str(ROOT / "recipes" / "sentiment.py"), "--quantization", quantization]
    command += ["--lora-init", init, "--train-seed", str(seed), "--output", str(folder)]
    subprocess.run(command, check=True, cwd=ROOT)
    result = json.loads((folder / "results.json").read_text())
    result["machine"] = machine()
    return result


def table(seeds: list[int]) -> tuple[str, dict]:
    """The markdown table of every configuration with at least one run, and the accuracies read."""
    found = {c: {s: json.loads(p.read_text()) for s in seeds if (p := result_path(*c, s)).exists()} for c in CONFIGS}
    baseline = [r["accuracy"] for r in found[CONFIGS[0]].values()]
    lines = [
        "| base | LoRA start | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | spread | vs unquantized default |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for (quantization, init), results in found.items():
        if not results:
            continue
        by_seed = {seed: r["accuracy"] for seed, r in results.items()}
        accuracies = list(by_seed.values())
        mean = statistics.mean(accuracies)
        cells = [f"{100 * by_seed[s]:.1f}%" if s in by_seed else "-" for s in seeds]
        against = f"{100 * (mean - statistics.mean(baseline)):+.2f} points" if baseline else "-"
        spread = f"{100 * (max(accuracies) - min(accuracies)):.1f} points" if len(accuracies) > 1 else "-"
        base = "unquantized (fp32)" if quantization == "none" else quantization.upper()
        lines.append(f"| {base} | {init} | " + " | ".join(cells) + f" | **{100 * mean:.2f}%** | {spread} | {against} |")
    return "\n".join(lines), found


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--table-only", action="store_true", help="no runs: the table from the results already saved")
    p.add_argument("--output", type=Path, default=ROOT / "runs" / "lora-init")
    args = p.parse_args(argv)
    missing = [(*c, s) for c in CONFIGS for s in args.seeds if not result_path(*c, s).exists()]
    for quantization, init, seed in tqdm([] if args.table_only else missing, desc="runs"):
        result = run(quantization, init, seed, args.output)
        result_path(quantization, init, seed).write_text(json.dumps(result, indent=2) + "\n")
    text, found = table(args.seeds)
    machines = sorted({r["machine"]["cpu"] for rs in found.values() for r in rs.values() if "machine" in r})
    note = (
        "Sentiment recipe (SmolLM2-135M-Instruct, LoRA r=8 on every linear layer, the default budget), accuracy on "
        "held-out movies; each cell one training seed, the split kept. "
        f"CPU: {'; '.join(machines) or machine()['cpu']}.\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora-init.md").write_text("# Where LoRA starts (sentiment)\n\n" + note + "\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
