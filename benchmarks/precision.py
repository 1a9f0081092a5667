"""bf16 against fp32 on this CPU: what ``backbone/precision.py`` decides from, shown for the model's shapes.

    python benchmarks/precision.py             # matmuls of SmolLM2-135M's shapes, fp32 vs bf16
    python benchmarks/precision.py --quick

For each (tokens x in x out) shape of a LoRA training step on SmolLM2-135M (hidden 576, MLP 1536, keys and
values 192) the best of ``--repeats`` timings of ``F.linear`` in fp32 and in bf16, in GFLOP/s, and their
ratio; then what ``"auto"`` resolves to here (the CPU's flags, the cached probe, the override). Writes
results/precision[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (1024, 576, 192), (4096, 576, 1536)]


def gflops(tokens: int, inputs: int, outputs: int, dtype: torch.dtype, repeats: int) -> float:
    x, w = torch.randn(tokens, inputs, dtype=dtype), torch.randn(outputs, inputs, dtype=dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return 2 * tokens * inputs * outputs / best / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    from common import machine, write_results

    from adapters.backbone import precision

    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 2 if args.quick else args.repeats
    rows = []
    for shape in shapes:
        fp32, bf16 = (gflops(*shape, dtype, repeats) for dtype in (torch.float32, torch.bfloat16))
        rows.append({"shape": shape, "fp32_gflops": fp32, "bf16_gflops": bf16, "bf16_speedup": bf16 / fp32})
    native, amx = precision.cpu_native_bf16()
    decision = {
        "native_bf16": native,
        "amx": amx,
        "override": os.environ.get(precision.OVERRIDE),
        "probe_speedup": precision.cpu_bf16_speedup() if native and not amx else None,
        "auto_mixed_precision": precision.resolve_mixed_precision("auto", "cpu"),
        "auto_compute_dtype": str(precision.default_compute_dtype(torch.device("cpu"))).removeprefix("torch."),
    }
    lines = ["| tokens x in x out | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |", "|---|---|---|---|"]
    lines += [
        f"| {' x '.join(map(str, r['shape']))} | {r['fp32_gflops']:.0f} | {r['bf16_gflops']:.0f} | "
        f"{r['bf16_speedup']:.2f} |"
        for r in rows
    ]
    text = "\n".join(lines) + (
        f"\n\n`F.linear`, best of {repeats}, {torch.get_num_threads()} threads. This CPU: native bf16 "
        f"{decision['native_bf16']}, AMX {decision['amx']}; the policy's probe (1024 x 576 x 1536, cached): "
        f"{decision['probe_speedup'] if decision['probe_speedup'] is None else round(decision['probe_speedup'], 2)}"
        f' (bf16 needs >= {precision.MIN_SPEEDUP}); `"auto"` resolves to mixed_precision='
        f"{decision['auto_mixed_precision']!r}, compute dtype {decision['auto_compute_dtype']}."
    )
    payload = {"machine": machine(), "rows": rows, "decision": decision, "repeats": repeats}
    write_results("precision" + ("-quick" if args.quick else ""), payload, text, args.out)
    print(text)


if __name__ == "__main__":
    main()
