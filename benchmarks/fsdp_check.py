"""FSDP2 keeps 4-bit weights intact: one sharded training step in bf16, the packed NF4 bytes compared before
and after (bitsandbytes#1945, accelerate#3983: a cast in the all-gather corrupts them silently).

    python benchmarks/fsdp_check.py                 # smollm2-135m; one process (world size 1), nccl on a GPU
    python benchmarks/fsdp_check.py --model DIR     # any model folder

World size 1 is enough for what is checked: FSDP2 still all-gathers (a copy) in its ``param_dtype`` and
reshards, so a conversion of the bytes would show. Multi-process equality is tested on CPU
(``tests/test_fsdp.py``). Writes ``<out>/fsdp-check<name>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def packed_digest(model) -> str:
    """One digest of every 4-bit weight's packed bytes, gathered whole."""
    import bitsandbytes as bnb
    import torch

    digest = hashlib.sha256()
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            weight = layer.weight
            whole = weight.full_tensor() if hasattr(weight, "full_tensor") else weight.data
            digest.update(whole.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def check(model_name: str) -> dict:
    import torch
    import torch.distributed as dist

    import adapters
    from adapters.sharding.fsdp import shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
    gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    model = adapters.adapt(
        model_name, adapter=adapters.LoRA(r=8), head=adapters.Classification(labels=["a", "b"]), quantization="nf4"
    )
    before = packed_digest(model)
    report = shard(model, "bf16", dist.get_world_size())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    vocab = model.backbone.config.vocab_size
    ids = torch.randint(min(4, vocab - 1), min(1000, vocab), (2, 32), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    labels = torch.tensor([0, 1], device=model.device)
    model.train()
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)["loss"]
    loss.backward()
    optimizer.step()
    after = packed_digest(model)
    dist.destroy_process_group()
    return {
        "model": model_name,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "world_size": 1,
        "gather_dtype": report.gather_dtype,
        "loss": loss.item(),
        "loss_finite": bool(torch.isfinite(loss)),
        "nf4_bytes_unchanged": before == after,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="")
    args = p.parse_args(argv)
    result = check(args.model)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"fsdp-check{args.name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0 if result["nf4_bytes_unchanged"] and result["loss_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
