"""``qadapters`` (or ``python -m adapters``): the library without writing Python.

    qadapters train recipes/configs/sentiment.yaml train.lr=1e-4 adapter.r=16
    qadapters eval runs/sentiment --data test.csv
    qadapters predict runs/sentiment "a moving, funny film"
    qadapters predict runs/sentiment --input texts.jsonl --output predictions.jsonl
    qadapters merge runs/sentiment runs/sentiment-merged
    qadapters info runs/sentiment
    qadapters estimate recipes/configs/sentiment.yaml train.batch_size=32 --device cuda

Every command is a thin layer over the Python API (``adapt``, ``train``, ``load``, ...); bad
input prints one ``error:`` line naming the problem and exits with status 2; a training run
stopped by a NaN loss exits with 1, one interrupted by SIGTERM/SIGINT (after saving a
checkpoint) with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TextIO

from adapters.errors import AdaptersError, ConfigError, DataError, TrainingError, TrainingInterrupted

EXAMPLES = {
    "train": "qadapters train recipes/configs/sentiment.yaml train.epochs=2 adapter.r=16",
    "eval": "qadapters eval runs/sentiment --data reviews.csv --text-column review --label-column stars",
    "predict": 'qadapters predict runs/sentiment "a moving, funny film" "a tedious mess"\n'
    "  qadapters predict runs/sentiment --input texts.jsonl --output predictions.jsonl",
    "merge": "qadapters merge runs/sentiment runs/sentiment-merged",
    "info": "qadapters info runs/sentiment",
    "export": "qadapters export runs/sentiment runs/sentiment-export\n"
    "  python -c \"from transformers import pipeline; print(pipeline('text-classification', "
    "model='runs/sentiment-export')('a moving film'))\"",
    "serve": "qadapters serve sentiment=runs/sentiment licence=runs/licence --port 8000\n"
    "  curl -s localhost:8000/v1/models/sentiment/predict -H 'Content-Type: application/json' "
    '-d \'{"texts": ["a moving film"]}\'',
    "estimate": "qadapters estimate recipes/configs/sentiment.yaml train.batch_size=32 --device cuda",
    "quantize": "qadapters quantize smollm2-135m bases/smollm2-135m-nf4\n"
    "  torchrun --nproc-per-node 2 -m adapters train recipes/configs/sentiment.yaml "
    "model.name=bases/smollm2-135m-nf4 train.fsdp=true",
}


def _split_rows(run):
    from adapters.data.sources import group_split, load_rows, sample

    data = run.data
    rows = load_rows(data.train)
    if data.eval is not None:
        eval_rows = load_rows(data.eval)
    else:
        if data.group_column and rows and data.group_column not in rows[0]:
            raise AdaptersError(
                f"data.group_column={data.group_column!r} is not a column of {data.train}; columns: {sorted(rows[0])}"
            )
        rows, eval_rows = group_split(rows, data.group_column, data.eval_fraction, data.seed)
    return sample(rows, data.train_size, data.seed), sample(eval_rows, data.eval_size, data.seed)


def _estimate(run, device: str | None, processes: int, fsdp: bool):
    from adapters.memory.estimate import estimate_memory

    m, t = run.model, run.train
    return estimate_memory(
        m.name,
        adapter=run.adapter,
        head=run.head,
        quantization=m.quantization,
        batch_size=t.batch_size,
        seq_len=m.max_length or 512,
        gradient_checkpointing=t.gradient_checkpointing,
        optimizer=t.optimizer,
        mixed_precision=t.mixed_precision,
        processes=processes,
        fsdp=fsdp,
        device=device,
        dtype=m.dtype,
        double_quant=m.double_quant,
        trust_remote_code=m.trust_remote_code,
    )


def cmd_estimate(args) -> int:
    from adapters.config.run_file import load_run_config

    estimate = _estimate(load_run_config(args.config, args.overrides), args.device, args.processes, args.fsdp)
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.table())
    return 0


def cmd_train(args) -> int:
    from adapters.artifacts.format import check_destination
    from adapters.backbone.loading import process_state
    from adapters.config.run_file import load_run_config
    from adapters.data.encoding import check_rows
    from adapters.files import destination_lock, probe_writable
    from adapters.files.durable import remove_orphans
    from adapters.training.checkpoint import check_output_dir

    run = load_run_config(args.config, args.overrides + (["train.overwrite=true"] if args.overwrite else []))
    if args.estimate_only:
        print(_estimate(run, None, 1, False).table())
        return 0
    train_rows, eval_rows = _split_rows(run)
    print(f"data: {len(train_rows)} training rows, {len(eval_rows)} evaluation rows")
    # everything that can be checked before the model loads: the rows against the head, the folders
    t = run.train
    check_rows(train_rows, run.head, t.text_column, t.label_column, f"{run.data.train} (training rows)")
    check_rows(eval_rows, run.head, t.text_column, t.label_column, "evaluation rows")
    check_destination(Path(run.output), t.overwrite)
    check_output_dir(t.output_dir, t.resume, t.overwrite)
    for where, what in ((run.output, "output"), (t.output_dir, "train.output_dir")):
        if where is not None:
            probe_writable(where, what)
    main_process = process_state().is_main_process
    with destination_lock(run.output, "artifact") if main_process else nullcontext():
        if main_process:
            remove_orphans(Path(run.output))  # what a killed earlier run left there, before a long run
        return _train_and_save(run, train_rows, eval_rows)


def _train_and_save(run: Any, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> int:
    """Load, train and save ``run`` (checked by ``cmd_train``), holding the artifact's lock."""
    from adapters import adapt, train
    from adapters.artifacts.format import save_artifact
    from adapters.backbone.loading import cpu_only, process_state
    from adapters.backbone.precision import load_dtype, resolve_mixed_precision
    from adapters.config.run_file import to_yaml
    from adapters.sharding.fsdp import accelerate_fsdp_requested, check_fsdp
    from adapters.training.checkpoint import write_run_record

    m, t = run.model, run.train
    if t.fsdp or accelerate_fsdp_requested():
        check_fsdp(m.quantization, resolve_mixed_precision(t.mixed_precision))
    model = adapt(
        m.name,
        adapter=run.adapter,
        head=run.head,
        quantization=m.quantization,
        dtype=load_dtype(m.dtype, t.mixed_precision, "cpu" if cpu_only() else "cuda"),
        max_length=m.max_length,
        padding_side=m.padding_side,
        double_quant=m.double_quant,
        trust_remote_code=m.trust_remote_code,
        seed=run.data.seed,
        fsdp=t.fsdp or accelerate_fsdp_requested(),  # under torchrun: each process loads only its shard
    )
    print(model.summary())
    metrics = train(model, train_rows, eval_rows, run.train)
    save_artifact(model, run.output, overwrite=t.overwrite, text_files={"config.yaml": to_yaml(run)})
    if process_state().is_main_process:  # under torchrun, one report, not one per process
        if t.output_dir is not None:  # run.json names the artifact once it is there
            write_run_record(t.output_dir, artifact=str(Path(run.output).resolve()))
        print(json.dumps(metrics, indent=2))
        print(f"artifact saved to {run.output}")
    return 0


def cmd_eval(args) -> int:
    from adapters import evaluate, load
    from adapters.artifacts.format import read_spec
    from adapters.data.encoding import check_rows
    from adapters.data.sources import load_rows

    spec = read_spec(args.artifact)
    columns = spec.columns  # the columns it was trained on, by default
    text_column = args.text_column or columns.get("text", "text")
    label_column = args.label_column or columns.get("label", "label")
    rows = load_rows(args.data)  # before the model: a bad file fails at once
    for flag, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in rows[0]:
            raise DataError(
                f"{args.data} has no column {column!r} (its columns: {sorted(rows[0])}); name the column with {flag}"
            )
    # every row's text and label against the head, before the model loads
    check_rows(rows, spec.head_spec(Path(args.artifact)), text_column, label_column, args.data)
    model = load(args.artifact, verify=not args.no_verify)
    metrics = evaluate(model, rows, text_column=text_column, label_column=label_column, batch_size=args.batch_size)
    print(json.dumps(metrics, indent=2))
    return 0


def _input_rows(source: Path, text_column: str, head: Any) -> list[dict[str, Any]]:
    """The rows of ``--input`` (CSV, TSV, JSONL or Parquet, as ``eval`` reads them), checked against the
    head before any model loads: the text column present, no empty text, each named by its file line."""
    from adapters.data.encoding import check_rows
    from adapters.data.sources import load_rows

    if not source.is_file():
        raise DataError(f"--input {source} does not exist")
    rows = load_rows(str(source))
    if text_column not in rows[0]:
        raise DataError(
            f"--input {source} has no {text_column!r} field (its fields: {sorted(rows[0])}); pass --text-column "
            f"to name the field that holds the input"
        )
    check_rows(rows, head, text_column, None, f"--input {source}")
    return rows


def cmd_predict(args) -> int:
    from tqdm.auto import tqdm

    from adapters import load
    from adapters.artifacts.format import read_spec

    if bool(args.texts) == bool(args.input):
        raise AdaptersError("give texts to predict, or --input FILE (with --output), not both")
    # everything that can be checked is checked before the model loads: the input's rows, the output's place
    output = Path(args.output) if args.output else None
    if output is not None and output.exists():
        raise ConfigError(f"--output {output} exists; choose a new file (predictions never overwrite a file)")
    head = read_spec(args.artifact).head_spec(Path(args.artifact))
    generate = _generation_settings(args, head)
    rows = _input_rows(Path(args.input), args.text_column, head) if args.input else None
    model = load(args.artifact, verify=not args.no_verify)
    if rows is None:
        predictions = model.predict(args.texts, probabilities=args.probabilities, **generate)
        for text, prediction in zip(args.texts, predictions, strict=True):
            print(json.dumps({"input": text, "prediction": prediction}))
        return 0
    with _output(output) as out, tqdm(desc="predict", unit="rows", disable=output is None) as bar:
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            inputs = [row[args.text_column] for row in batch]
            predictions = model.predict(
                inputs, probabilities=args.probabilities, batch_size=args.batch_size, **generate
            )
            for row, prediction in zip(batch, predictions, strict=True):
                out.write(json.dumps({**row, "prediction": prediction}, default=str) + "\n")
            bar.update(len(batch))
    return 0


def _generation_settings(args: Any, head: Any) -> dict[str, Any]:
    """``generate`` keywords from --max-new-tokens, --temperature, --top-p, --seed (sampling when a
    temperature or top-p is given); refused, before the model loads, for a head that does not generate."""
    import torch

    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    settings = {k: v for k, v in given.items() if v is not None}
    if not settings and args.seed is None:
        return {}
    if not head.lm_logits:
        flags = [f"--{k.replace('_', '-')}" for k in settings] + (["--seed"] if args.seed is not None else [])
        raise ConfigError(
            f"{', '.join(flags)}: generation settings, but this artifact's head ({head.kind}) does not generate text"
        )
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if args.temperature is not None and args.temperature <= 0:
        raise ConfigError(f"--temperature={args.temperature} must be positive (leave it out for greedy decoding)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p={args.top_p} must be in (0, 1]")
    if args.temperature is not None or args.top_p is not None:
        settings["do_sample"] = True
    if args.seed is not None:
        torch.manual_seed(args.seed)  # sampling draws from torch's global generator
    return settings


@contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    """Standard output, or ``path`` written whole or not at all: the lines go to a sibling file of ours,
    renamed into place at the end; a run that fails leaves nothing behind."""
    if path is None:
        yield sys.stdout
        return
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as out:  # the name is ours: a killed run's is replaced
            yield out
    except BaseException:
        partial.unlink(missing_ok=True)  # ours, and incomplete
        raise
    if path.exists():  # appeared while predicting: never replace a file we did not write
        raise ConfigError(f"--output {path} appeared while predicting; the predictions are in {partial}")
    os.replace(partial, path)


def cmd_merge(args) -> int:
    from adapters.artifacts.merge import merge_artifact

    merge_artifact(args.artifact, args.out, overwrite=args.overwrite, verify=not args.no_verify)
    return 0


def cmd_quantize(args) -> int:
    from adapters.backbone.prequantize import quantize_base

    out = quantize_base(
        args.base,
        args.out,
        args.quantization,
        double_quant=not args.no_double_quant,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(f"{args.quantization} base written to {out}: pass it as the model (adapt, model.name) to skip quantizing")
    return 0


def cmd_export(args) -> int:
    from adapters.artifacts.export import export_for_pipeline

    export_for_pipeline(args.artifact, args.out, overwrite=args.overwrite, verify=not args.no_verify)
    return 0


def cmd_serve(args) -> int:
    from adapters.serving.server import Limits, serve

    for name in ("max_batch", "max_texts", "max_chars", "port"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.max_loras < 0:
        raise ConfigError(f"--max-loras={args.max_loras} must be 0 or more")
    if args.max_queue < 1 or args.timeout <= 0:
        raise ConfigError(f"--max-queue={args.max_queue} and --timeout={args.timeout} must be positive")
    limits = Limits(
        args.max_batch, args.max_wait_ms, args.max_texts, args.max_chars, args.max_queue, args.timeout, args.max_loras
    )
    api_key = args.api_key or os.environ.get("QADAPTERS_API_KEY") or None
    serve(
        args.artifacts,
        args.host,
        args.port,
        limits,
        args.device,
        api_key=api_key,
        insecure=args.insecure,
        verify=not args.no_verify,
    )
    return 0


def cmd_info(args) -> int:
    from adapters.artifacts.format import read_spec

    spec = read_spec(args.artifact)
    training = spec.training if isinstance(spec.training, dict) else {}
    rows = [
        ("base", f"{spec.base.name} ({spec.base.model_type})"),
        ("quantization", spec.quantization or "none"),
        ("adapter", json.dumps(spec.adapter) if spec.adapter else "none (head only)"),
        ("head", json.dumps(spec.head)),
        ("columns", json.dumps(spec.columns)),
        ("trainable params", training.get("trainable_parameters", "?")),
        ("training metrics", json.dumps(training.get("metrics", {}))),
        ("versions", json.dumps(spec.versions)),
    ]
    if spec.merged_from:
        rows.insert(3, ("merged from", spec.merged_from))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="qadapters", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = main.add_subparsers(dest="command", required=True)
    for name, help, arguments, run in COMMANDS:
        p = sub.add_parser(
            name,
            help=help,
            description=f"{help}\n\nexample:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        arguments(p)
        p.set_defaults(run=run)
    return main


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file with sections model, adapter, head, data, train, output")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 adapter.r=16")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier artifact at OUTPUT and start afresh in an output_dir holding an earlier run "
        "(train.overwrite=true); only the files the library wrote there are removed",
    )
    p.add_argument(
        "--estimate-only",
        action="store_true",
        help="print the memory this run needs per device (from the config alone) and stop",
    )


def _estimate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML training config (as for train)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=32 model.max_length=1024")
    p.add_argument("--device", choices=["cuda", "cpu"], help="where it will train (default: this machine's)")
    p.add_argument("--processes", type=int, default=1, help="data-parallel processes (DDP, or FSDP with --fsdp)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer states (FSDP)")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")


def _no_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the artifact's files against the sha256 its manifest records (for files you edited)",
    )


def _eval_args(p: argparse.ArgumentParser) -> None:
    _no_verify_arg(p)
    p.add_argument("artifact", help="folder written by save_pretrained / qadapters train")
    p.add_argument("--data", required=True, help="CSV/TSV/JSONL/Parquet file, packaged dataset or hub dataset")
    p.add_argument("--text-column", help="column of the inputs (default: the one the artifact was trained on)")
    p.add_argument("--label-column", help="column of the labels (default: the one the artifact was trained on)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per batch (default: batches of up to 2,048 padded tokens on CPU, 8,192 on GPUs, sorted by length)",
    )


def _predict_args(p: argparse.ArgumentParser) -> None:
    _no_verify_arg(p)
    p.add_argument("artifact")
    p.add_argument("texts", nargs="*", help="texts to predict")
    p.add_argument("--input", help="CSV, TSV, JSONL or Parquet file of rows with a text field")
    p.add_argument(
        "--output", help="JSONL file to write (rows + prediction), whole or not at all; standard output when absent"
    )
    p.add_argument("--text-column", default="text", help="field of --input rows holding the input")
    p.add_argument("--max-new-tokens", type=int, help="generative heads: tokens to generate at most")
    p.add_argument("--temperature", type=float, help="generative heads: sample at this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, help="generative heads: sample from the smallest set of this probability")
    p.add_argument("--seed", type=int, help="generative heads: the random seed of sampling")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--probabilities", action="store_true", help="also return probabilities")


def _merge_args(p: argparse.ArgumentParser) -> None:
    _no_verify_arg(p)
    p.add_argument("artifact")
    p.add_argument("out", help="folder to write the merged model to")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def _export_args(p: argparse.ArgumentParser) -> None:
    _no_verify_arg(p)
    p.add_argument("artifact")
    p.add_argument("out", help="folder to write the exported model to")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")


def _serve_args(p: argparse.ArgumentParser) -> None:
    _no_verify_arg(p)
    p.add_argument("artifacts", nargs="+", help="artifact folders, or NAME=FOLDER to choose the name in the URL")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="inputs run together in one batch at most")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max-texts", type=int, default=256, help="inputs one request may hold")
    p.add_argument("--max-chars", type=int, default=20_000, help="characters one input may hold")
    p.add_argument("--max-queue", type=int, default=1024, help="inputs waiting per model; past it: 503 + Retry-After")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait for its answer (then 504)")
    p.add_argument(
        "--max-loras", type=int, default=8, help="artifacts loaded at run time (/v1/load_lora_adapter) at once"
    )
    p.add_argument(
        "--api-key", help="a Bearer token every /v1/ request must send (default: $QADAPTERS_API_KEY; none: open)"
    )
    p.add_argument("--insecure", action="store_true", help="listen beyond this machine without an API key")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: this process's device)")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="a packaged model name, a local model folder or a cached hub id")
    p.add_argument("out", help="folder to write the 4-bit base to")
    p.add_argument("--quantization", choices=["nf4", "fp4"], default="nf4")
    p.add_argument("--no-double-quant", action="store_true", help="keep the block scales in fp32 (QLoRA's off)")
    p.add_argument("--dtype", help="cast the weights to this dtype before quantizing (default: this machine's)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quantized base in OUT")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact")


COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    ("train", "train an adapter and head from a YAML config, then save the artifact", _train_args, cmd_train),
    (
        "estimate",
        "memory per device that a training config needs, from the model's config alone",
        _estimate_args,
        cmd_estimate,
    ),
    ("eval", "metrics of a saved artifact on a dataset", _eval_args, cmd_eval),
    (
        "predict",
        "predict texts given on the command line or read from a CSV, JSONL or Parquet file",
        _predict_args,
        cmd_predict,
    ),
    (
        "merge",
        "merge a LoRA artifact into its (dequantized) base: a standalone transformers folder",
        _merge_args,
        cmd_merge,
    ),
    (
        "export",
        "write a standard AutoModelForSequenceClassification folder for transformers.pipeline",
        _export_args,
        cmd_export,
    ),
    (
        "serve",
        "serve artifacts over HTTP; artifacts on the same base share one copy of it",
        _serve_args,
        cmd_serve,
    ),
    (
        "quantize",
        "write a base once in 4-bit (transformers' layout): later loads, whole or sharded, skip quantizing",
        _quantize_args,
        cmd_quantize,
    ),
    ("info", "describe an artifact: base, quantization, adapter, head, metrics, versions", _info_args, cmd_info),
]
"""Each subcommand: its name, help, arguments and the function that runs it (``cmd_*``)."""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except AdaptersError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:  # SIGTERM/SIGINT: a checkpoint was saved, the message says how to resume
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
