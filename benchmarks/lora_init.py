"""Where LoRA starts, measured on the recipes: the unquantized base with peft's default start against NF4 with
each start (default, LoftQ, EVA) and the unquantized base with PiSSA, over training seeds (the split kept, so
the spread is run-to-run), in one table with the CPU named (#46).

    python benchmarks/lora_init.py                 # sentiment: every missing run (about 5 minutes each), the table
    python benchmarks/lora_init.py --recipe legal --seeds 0   # legal category (about 7 minutes a run)
    python benchmarks/lora_init.py --recipe assistant --seeds 0 --configs nf4-default nf4-eva   # 35-45 minutes a run
    python benchmarks/lora_init.py --table-only    # the table from the runs already in recipes/results

Each run is the recipe (``recipes/sentiment.py``; ``recipes/legal.py --task category`` at a reduced budget:
1,000 notices, one epoch; ``recipes/legal_assistant.py`` at its default budget, without the zero-shot answers)
with ``--quantization Q --lora-init I`` and its training seed, in a fresh process, its results saved as
``recipes/results/{sentiment,legal-category,legal-assistant}-{Q}-{I}-seed{S}.json`` with the machine that ran
it; a run already there is reused. The table gives each configuration's mean and spread (max - min) over seeds,
and its mean against the unquantized default's: a start "wins" only by more than the seeds' spread.
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
# each recipe: its results' prefix, its command before the common flags, how the table describes it, and the
# scores it reads from a run's results (a name, and the keys down to the number)
ACCURACY = {"accuracy": ("accuracy",)}
RECIPES = {
    "sentiment": (
        "sentiment",
        ["recipes/sentiment.py"],
        "Sentiment recipe (SmolLM2-135M-Instruct, LoRA r=8 on every linear layer, the default budget), accuracy on "
        "held-out movies",
        ACCURACY,
    ),
    "legal": (
        "legal-category",
        ["recipes/legal.py", "--task", "category", "--train-size", "1000", "--epochs", "1"],
        "Legal category recipe (SmolLM2-135M-Instruct, LoRA r=8, mean pooling, the head fitted first; 1,000 "
        "notices, one epoch: 63 steps, a quarter of the default 250), accuracy on 600 notices of held-out licences",
        ACCURACY,
    ),
    "assistant": (
        "legal-assistant",
        ["recipes/legal_assistant.py", "--no-zero-shot"],
        "Legal assistant recipe (SmolLM2-135M-Instruct, LoRA r=16, 480 conversations, one epoch: 60 steps, the "
        "default budget), per-turn scores on 120 conversations about held-out licences",
        {
            "SPDX id exact": ("fine_tuned", "spdx_exact_match"),
            "category": ("fine_tuned", "category_accuracy"),
            "follow-ups right": ("fine_tuned", "follow_up_accuracy"),
            "whole conversation": ("fine_tuned", "conversation_all_right"),
        },
    ),
}


def result_path(quantization: str, init: str, seed: int, recipe: str = "sentiment") -> Path:
    return RUNS / f"{RECIPES[recipe][0]}-{quantization}-{init}-seed{seed}.json"


def run(quantization: str, init: str, seed: int, output: Path, recipe: str = "sentiment") -> dict:
    """One recipe run in a fresh process; its results with the machine stamped in."""
    folder = output / f"{recipe}-{quantization}-{init}-seed{seed}"
    script, *flags = RECIPES[recipe][1]
    command = [sys.executable, str(ROOT / script), *flags, "--quantization", quantization, "--lora-init", init]
    command += ["--train-seed", str(seed), "--output", str(folder)]  # the split kept
    subprocess.run(command, check=True, cwd=ROOT)
    result = json.loads((folder / "results.json").read_text())
    result["machine"] = machine()
    return result


def score(result: dict, keys: tuple[str, ...]) -> float:
    for key in keys:
        result = result[key]
    return float(result)  # type: ignore[arg-type]


def table(seeds: list[int], recipe: str = "sentiment") -> tuple[str, dict]:
    """The markdown table of every configuration with at least one run (a row per score the recipe reports),
    and the results read."""
    found = {
        c: {s: json.loads(p.read_text()) for s in seeds if (p := result_path(*c, s, recipe)).exists()} for c in CONFIGS
    }
    scores = RECIPES[recipe][3]
    named = len(scores) > 1  # a score column only where the recipe has several
    lines = [
        "| base | LoRA start | "
        + ("score | " if named else "")
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | spread | vs unquantized default |",
        "|---|---|" + ("---|" if named else "") + "---|" * len(seeds) + "---|---|---|",
    ]
    for (quantization, init), results in found.items():
        base = "unquantized (fp32)" if quantization == "none" else quantization.upper()
        for name, keys in scores.items() if results else ():
            by_seed = {seed: score(r, keys) for seed, r in results.items()}
            baseline = [score(r, keys) for r in found[CONFIGS[0]].values()]
            mean = statistics.mean(by_seed.values())
            cells = [f"{100 * by_seed[s]:.1f}%" if s in by_seed else "-" for s in seeds]
            against = f"{100 * (mean - statistics.mean(baseline)):+.2f} points" if baseline else "-"
            spread = f"{100 * (max(by_seed.values()) - min(by_seed.values())):.1f} points" if len(by_seed) > 1 else "-"
            lines.append(
                f"| {base} | {init} | "
                + (f"{name} | " if named else "")
                + " | ".join(cells)
                + f" | **{100 * mean:.2f}%** | {spread} | {against} |"
            )
    return "\n".join(lines), found


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="sentiment")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", help="only these, as QUANTIZATION-INIT (e.g. nf4-eva); default: all")
    p.add_argument("--table-only", action="store_true", help="no runs: the table from the results already saved")
    p.add_argument("--output", type=Path, default=ROOT / "runs" / "lora-init")
    args = p.parse_args(argv)
    configs = [c for c in CONFIGS if not args.configs or "-".join(c) in args.configs]
    missing = [(*c, s) for c in configs for s in args.seeds if not result_path(*c, s, args.recipe).exists()]
    for quantization, init, seed in tqdm([] if args.table_only else missing, desc="runs"):
        result = run(quantization, init, seed, args.output, args.recipe)
        result_path(quantization, init, seed, args.recipe).write_text(json.dumps(result, indent=2) + "\n")
    text, found = table(args.seeds, args.recipe)
    machines = sorted({r["machine"]["cpu"] for rs in found.values() for r in rs.values() if "machine" in r})
    note = (
        f"{RECIPES[args.recipe][2]}; each cell one training seed, the split kept. "
        f"CPU: {'; '.join(machines) or machine()['cpu']}.\n"
    )
    notes = [f"{q}-{i} seed {s}: {r['note']}" for (q, i), rs in found.items() for s, r in rs.items() if "note" in r]
    note += "".join(f"\n{n}.\n" for n in notes)  # a run that came from elsewhere says so
    name = "lora-init.md" if args.recipe == "sentiment" else f"lora-init-{args.recipe}.md"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(f"# Where LoRA starts ({args.recipe})\n\n" + note + "\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
