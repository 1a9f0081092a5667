"""Loads a model sharded (``adapt(..., fsdp=True)``) under however many processes launched it, then loads it
whole in the same process (the ordinary load), and writes what tests/test_shard_load.py compares: whether
each rank's chunk of every frozen parameter equals the same slice of the whole load (4-bit: the packed bytes
and the whole quantization state), and what the sharded model computes."""

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import adapters  # noqa: E402
from adapters.backbone.loading import load_backbone  # noqa: E402

TEXTS = ["good fun film", "a dull mess", "not bad at all"]


def compare(sharded, whole) -> dict:
    """Per parameter of the sharded backbone: does this rank's chunk equal the whole load's same rows?"""
    import bitsandbytes as bnb

    rank, world = dist.get_rank(), dist.get_world_size()
    whole_modules = dict(whole.named_modules())
    found: dict[str, bool] = {}
    for name, module in sharded.named_modules():
        bare = name.replace(".base_layer", "")
        for pname, param in module._parameters.items():
            if param is None or param.requires_grad or not hasattr(param, "to_local"):
                continue
            reference = whole_modules[bare]._parameters[pname]
            local = param.to_local()
            if isinstance(module, bnb.nn.Linear4bit) and pname == "weight":
                ref = reference.data.reshape(-1).view(torch.uint8)
                mine = local.reshape(-1).view(torch.uint8)
                size = -(-ref.numel() // local.element_size() // world) * local.element_size()
                same = torch.equal(mine, ref[rank * size : rank * size + mine.numel()])
                same = same and _same_state(module.quant_state, reference.quant_state)
            else:
                rows = -(-reference.shape[0] // world)
                same = torch.equal(local, reference.data[rank * rows : rank * rows + local.shape[0]])
            found[f"{bare}.{pname}"] = bool(same)
    return found


def _same_state(a, b) -> bool:
    if not (torch.equal(a.absmax, b.absmax) and a.shape == b.shape and a.dtype == b.dtype):
        return False
    if a.nested != b.nested:
        return False
    return not a.nested or (torch.equal(a.offset, b.offset) and torch.equal(a.state2.absmax, b.state2.absmax))


def run_case(model_path: str, quantization: str, dtype: str, head_kind: str) -> dict:
    quantization = None if quantization == "none" else quantization
    head = adapters.Classification(labels=["neg", "pos"]) if head_kind == "classification" else adapters.CausalLM()
    model = adapters.adapt(
        model_path, adapter=adapters.LoRA(r=4), head=head, quantization=quantization, dtype=dtype, fsdp=True
    )
    report = {"shard_report": model.shard_report.summary() if model.shard_report else None}
    whole, _ = load_backbone(model_path, quantization, dtype=dtype, with_lm_head=head.lm_logits)
    report["same"] = compare(model.backbone, whole)
    if head_kind == "classification":
        report["logits"] = model.logits(TEXTS).tolist()
    return report


def anonymous_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def load_memory(model_path: str) -> dict:
    """The peak growth of this process's anonymous memory while ``adapt(..., fsdp=True)`` loads (sampled every
    5 ms), against the whole frozen base's bytes."""
    import threading
    import time

    before, peak, loading = anonymous_bytes(), [0], [True]

    def sample():
        while loading[0]:
            peak[0] = max(peak[0], anonymous_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = adapters.adapt(
        model_path, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["a", "b"]), fsdp=True
    )
    loading[0] = False
    sampler.join()
    report = model.shard_report
    return {"growth": max(peak[0], anonymous_bytes()) - before, "frozen_bytes": report.frozen_bytes,
            "frozen_bytes_here": report.frozen_bytes_here}  # fmt: skip


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--case", action="append", help="MODEL,QUANTIZATION,DTYPE,HEAD (classification or causal)")
    p.add_argument("--memory", help="a model to measure the load's memory on, after the cases")
    args = p.parse_args()
    reports = [run_case(*case.split(",")) for case in args.case or ()]  # one launch, several loads
    gc.collect()
    # after the cases: imports, tokenizers and the process group are in place, so the growth is the load's own
    memory = load_memory(args.memory) if args.memory else None
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps({"memory": memory, "cases": reports}))


if __name__ == "__main__":
    main()
