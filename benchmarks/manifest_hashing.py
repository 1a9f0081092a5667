"""What verifying a manifest costs beside reading the same files: a checkpoint-like folder of GB-sized
safetensors files (random weights), hashed as ``load``/resume verify it (``files.manifest.verify``) and
loaded as resume loads it (``safetensors.torch.load_file``, each tensor copied out of the memory map),
alternating in fresh processes, medians and their ratio.

    python benchmarks/manifest_hashing.py --gb 1 --rounds 3

Both read from the page cache after the first round (the file was just written); a cold read from disk adds
the same I/O to both."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, run_child, write_results  # noqa: E402


def side(which: str, folder: Path) -> dict:
    from safetensors.torch import load_file

    from adapters.files import read_manifest, verify

    start = time.perf_counter()
    if which == "verify":
        manifest = read_manifest(folder)
        assert manifest is not None
        verify(folder, manifest)
    else:
        for file in sorted(folder.glob("*.safetensors")):  # memory-mapped: copied out, as load_state_dict does
            for tensor in load_file(str(file)).values():
                tensor.clone()
    return {"seconds": time.perf_counter() - start}


def build(folder: Path, gb: float) -> None:
    import torch
    from safetensors.torch import save_file

    from adapters.files.manifest import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    elements = int(gb * 2**30 / 4)
    save_file({"weights": torch.randn(elements // 1024, 1024)}, str(folder / "model.safetensors"))
    start = time.perf_counter()
    write_manifest(folder, "checkpoint")
    print(json.dumps({"manifest_seconds": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", choices=["verify", "load", "build"])
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.side == "build":
        return build(Path(args.folder), args.gb)
    if args.side:
        print(json.dumps(side(args.side, Path(args.folder))))
        return None
    with tempfile.TemporaryDirectory() as tmp:
        written = run_child(__file__, ["--side", "build", "--folder", tmp, "--gb", str(args.gb)])
        runs: dict[str, list[float]] = {"verify": [], "load": []}
        for r in range(args.rounds):
            for which in ("verify", "load") if r % 2 == 0 else ("load", "verify"):
                runs[which].append(run_child(__file__, ["--side", which, "--folder", tmp])["seconds"])
                print(f"round {r + 1} {which}: {runs[which][-1]:.2f} s", flush=True)
    median = {k: statistics.median(v) for k, v in runs.items()}
    table = (
        f"A {args.gb:g} GB safetensors file (random weights), {args.rounds} alternating rounds in fresh processes.\n\n"
        "| step | median s | GB/s |\n|---|---|---|\n"
        f"| write the manifest (sha256, at save) | {written['manifest_seconds']:.2f} | "
        f"{args.gb / written['manifest_seconds']:.2f} |\n"
        + "".join(f"| {k} | {v:.2f} | {args.gb / v:.2f} |\n" for k, v in median.items())
        + f"\nverify / load: **{median['verify'] / median['load']:.2f}x**\n"
    )
    payload = {"machine": machine(), "gb": args.gb, "runs": runs, "manifest_seconds": written["manifest_seconds"]}
    print(write_results("manifest_hashing", payload, table).read_text())
    return None


if __name__ == "__main__":
    main()
