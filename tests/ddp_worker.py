"""Trains a tiny model under however many processes launched it (torchrun / accelerate launch)
and writes what tests/test_distributed.py and tests/test_fsdp.py compare: each rank's trained tensors
(whole, also under FSDP) and metrics, and whether the saved artifact reloads with equal logits.
``--crash-at N`` ends the main process abruptly after step N (a crash: nothing is cleaned up). Several runs
separated by ``--then`` train one after another in the same processes (one launch, one process group), each
with its own options and ``--out``: a launch's start-up is most of a tiny run's time. What each run prints is
also written to its ``--out``/``printed<rank>.txt``, since the launch's output mixes every run's."""

import argparse
import contextlib
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import adapters  # noqa: E402
from adapters.backbone.sharded import full_trainable_state  # noqa: E402
from tests.helpers import toy_sentiment  # noqa: E402


def main():
    argv = sys.argv[1:]
    for is_separator, options in itertools.groupby(argv, lambda a: a == "--then"):
        if not is_separator:
            args = parse(list(options))
            with _printed_to(Path(args.out)):
                run(args)


class _Tee:
    """Writes to the launch's stdout and to this run's file (flushed at once: ``--crash-at`` ends abruptly)."""

    def __init__(self, stdout, file):
        self.stdout, self.file = stdout, file

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()
        return self.stdout.write(text)

    def flush(self) -> None:
        self.stdout.flush()

    def __getattr__(self, name: str):  # the rest of a text stream (isatty, encoding, fileno): the launch's stdout
        return getattr(self.stdout, name)


@contextlib.contextmanager
def _printed_to(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"printed{os.environ.get('RANK', '0')}.txt", "w") as file:
        with contextlib.redirect_stdout(_Tee(sys.stdout, file)):
            yield


def parse(options: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", choices=["lora", "bottleneck"], required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--linear-probe", action="store_true")
    p.add_argument("--train-rows", type=int, default=64)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--shard-load", action="store_true", help="adapt(fsdp=True): each rank reads only its shard")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "none"])
    p.add_argument("--resume", default=None)
    p.add_argument("--crash-at", type=int, default=None)
    p.add_argument("--mixed-precision", default="no")
    return p.parse_args(options)


def run(args: argparse.Namespace) -> None:
    # dropout 0: the only randomness left is the data order, shared by all runs through the seed
    adapter = adapters.LoRA(r=4, dropout=0.0) if args.adapter == "lora" else adapters.Bottleneck(reduction=4)
    model = adapters.adapt(
        args.model,
        adapter=adapter,
        head=adapters.Classification(labels=["neg", "pos"], dropout=0.0),
        quantization=None if args.quantization == "none" else args.quantization,
        dtype=args.dtype,
        fsdp=args.shard_load,
    )
    before = packed_4bit_bytes(model)
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
            fsdp=args.fsdp,
            mixed_precision=args.mixed_precision,
            resume=args.resume,
        ),
        callbacks=[Crash(args.crash_at)] if args.crash_at else (),
    )
    out = Path(args.out)
    state = PartialState()  # already set up by the library (with cpu=True on CPUs)
    trained = full_trainable_state(model)  # whole tensors, also when FSDP sharded them (a collective)
    save_file(trained, str(out / f"rank{state.process_index}.safetensors"))
    metrics["4bit_bytes_unchanged"] = packed_4bit_bytes(model) == before
    (out / f"metrics{state.process_index}.json").write_text(json.dumps(metrics))
    model.save_pretrained(out / "artifact")  # writes once, on the main process
    texts = ["good fun film", "a dull mess"]
    logits = model.logits(texts)  # every rank: a sharded model runs as one
    if state.is_main_process:
        again = adapters.load(out / "artifact")
        reloaded = again.logits(texts)
        same = torch.allclose(reloaded, logits, atol=1e-5)
        difference = float((reloaded - logits).abs().max())
        (out / "reload.json").write_text(json.dumps({"same_logits": bool(same), "max_logit_difference": difference}))


def packed_4bit_bytes(model) -> list[bytes]:
    """Every 4-bit weight's packed bytes, whole (gathered when sharded, in whatever dtype FSDP stores them)."""
    import bitsandbytes as bnb

    found = []
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            weight = layer.weight
            whole = weight.full_tensor() if hasattr(weight, "full_tensor") else weight.data
            found.append(whole.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return found


class Crash(adapters.Callback):
    """Ends the process without any cleanup once a step is done (after its checkpoint, if it saves one)."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, config, state, control, logs):
        if state.step >= self.step:
            os._exit(17)


if __name__ == "__main__":
    main()
