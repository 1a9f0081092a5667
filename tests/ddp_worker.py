"""Trains a tiny model under however many processes launched it (torchrun / accelerate launch)
and writes what tests/test_distributed.py compares: each rank's trained tensors and metrics."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import adapters  # noqa: E402
from tests.helpers import toy_sentiment  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", choices=["lora", "bottleneck"], required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--linear-probe", action="store_true")
    p.add_argument("--train-rows", type=int, default=64)
    args = p.parse_args()
    # dropout 0: the only randomness left is the data order, shared by all runs through the seed
    adapter = adapters.LoRA(r=4, dropout=0.0) if args.adapter == "lora" else adapters.Bottleneck(reduction=4)
    model = adapters.adapt(
        args.model,
        adapter=adapter,
        head=adapters.Classification(labels=["neg", "pos"], dropout=0.0),
        quantization="nf4",
    )
    metrics = adapters.train(
        model,
        toy_sentiment(args.train_rows),
        toy_sentiment(27, seed=1),
        adapters.TrainConfig(
            epochs=2,
            lr=1e-2,
            batch_size=args.batch_size,
            seed=3,
            progress=False,
            log_every=1,
            save_every=4,
            keep_last=2,
            output_dir=str(Path(args.out) / "logs"),
            linear_probe=args.linear_probe,
        ),
    )
    out = Path(args.out)
    state = PartialState()  # already set up by the library (with cpu=True on CPUs)
    trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(out / f"rank{state.process_index}.safetensors"))
    (out / f"metrics{state.process_index}.json").write_text(json.dumps(metrics))
    model.save_pretrained(out / "artifact")  # writes once, on the main process
    if state.is_main_process:
        again = adapters.load(out / "artifact")
        texts = ["good fun film", "a dull mess"]
        same = torch.allclose(again.logits(texts), model.logits(texts), atol=1e-5)
        (out / "reload.json").write_text(json.dumps({"same_logits": bool(same)}))


if __name__ == "__main__":
    main()
