"""A training run in its own process, for tests that kill it (SIGKILL, SIGTERM) and resume.

Each step is slowed (--step-delay) so a test can strike at an arbitrary step; --slow-save-at
makes the checkpoint of that step hang after writing its files, to be killed mid-save."""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import adapters  # noqa: E402
from tests.helpers import toy_sentiment  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--resume", default=None)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--slow-save-at", type=int, default=None)
    args = p.parse_args()

    if args.slow_save_at is not None:
        original = accelerate.Accelerator.save_state

        def save_state(self, output_dir=None, **kwargs):
            result = original(self, output_dir, **kwargs)
            if output_dir.endswith(f"step-{args.slow_save_at:06d}"):
                Path(args.out, "saving").write_text(output_dir)
                time.sleep(120)  # killed here, files written but not renamed into place
            return result

        accelerate.Accelerator.save_state = save_state

    model = adapters.adapt(
        args.model, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]), quantization="nf4"
    )
    forward = model.forward

    def slow_forward(**kwargs):
        time.sleep(args.step_delay)
        return forward(**kwargs)

    model.forward = slow_forward
    config = adapters.TrainConfig(
        max_steps=args.steps,
        lr=1e-2,
        batch_size=4,
        save_every=2,
        keep_last=2,
        log_every=1,
        seed=5,
        output_dir=str(Path(args.out) / "run"),
        resume=args.resume,
        progress=False,
    )
    try:
        metrics = adapters.train(model, toy_sentiment(24), None, config)
    except adapters.TrainingInterrupted as err:
        print(err, file=sys.stderr)
        sys.exit(143)
    trained = {n: t.detach().contiguous() for n, t in model.named_parameters() if t.requires_grad}
    save_file(trained, str(Path(args.out) / "final.safetensors"))
    Path(args.out, "result.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
