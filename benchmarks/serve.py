"""`qadapters serve` under load, on localhost: throughput and latency by concurrency, and the memory of
several artifacts on one base against one process per artifact.

    python benchmarks/serve.py                 # packaged SmolLM2-135M, nf4, 3 LoRA artifacts (about 6 min on 2 cores)
    python benchmarks/serve.py --quick --model PATH
    python benchmarks/serve.py --overload      # twice the measured capacity against a bounded queue
    python benchmarks/serve.py --generation    # the OpenAI endpoints: tokens/s, time to first token, memory

For each round (fresh server processes; rounds alternate the settings): a server of one artifact
answers a fixed number of single-text requests at each concurrency (1, 4, 16 clients), and the
resident memory (RSS) of a server of 1 artifact and of 3 artifacts on one base is read after a
warm-up request to each. N separate processes would hold N x the one-artifact memory. Medians over
the rounds. Writes results/serve[-quick].{json,md,png}.

``--overload``: one server with a bounded queue (``--max-queue``) first measures its capacity (requests/s
at 16 clients), then receives single-text requests at twice that rate, on a fixed schedule (open loop,
as real traffic arrives) for ``--seconds``. Admitted requests must be answered with bounded latency and
every other one refused at once with 503 + Retry-After; any other failure is counted. Writes
results/serve-overload[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_warm_start  # noqa: E402

TEXTS = [
    "a moving, funny and beautifully acted film",
    "a tedious mess",
    "not bad at all, though the plot drags",
    "one of the best films of the year",
    "the dialogue is flat and the pacing slow",
    "charming",
]


def make_artifacts(model: str, out: Path, count: int) -> list[Path]:
    import adapters

    paths = []
    for i in range(count):
        m = adapters.adapt(
            model, adapter=adapters.LoRA(r=8), seed=i, head=adapters.Classification(labels=["negative", "positive"])
        )
        m.save_pretrained(out / f"task{i}")
        paths.append(out / f"task{i}")
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _json_request(port: int, path: str, body: dict) -> urllib.request.Request:
    """A POST of ``body`` as JSON to this machine's server at ``path``."""
    return urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )


def _post(port: int, name: str, texts: list[str]) -> float:
    started = time.perf_counter()
    request = _json_request(port, f"/v1/models/{name}/predict", {"texts": texts, "probabilities": True})
    with urllib.request.urlopen(request, timeout=300) as answer:
        assert answer.status == 200
        json.loads(answer.read())
    return time.perf_counter() - started


def _post_status(port: int, name: str, texts: list[str]) -> tuple[int, float, str | None]:
    """(HTTP status, seconds, Retry-After) of one request; errors are answers too."""
    import urllib.error

    started = time.perf_counter()
    request = _json_request(port, f"/v1/models/{name}/predict", {"texts": texts})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            answer.read()
            return answer.status, time.perf_counter() - started, None
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - started, err.headers.get("Retry-After")
    except OSError:
        return -1, time.perf_counter() - started, None  # refused or reset: a failure


def overload_test(port: int, rate: float, seconds: float) -> dict:
    """Requests arriving at ``rate`` per second for ``seconds`` (each on its own thread, on schedule)."""
    answers: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        answer = _post_status(port, "task0", [TEXTS[i % len(TEXTS)]])
        with lock:
            answers.append(answer)

    threads, started = [], time.perf_counter()
    for i in range(int(rate * seconds)):
        time.sleep(max(0.0, started + i / rate - time.perf_counter()))
        thread = threading.Thread(target=one, args=(i,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    admitted = sorted(s for code, s, _ in answers if code == 200)
    refused = [a for a in answers if a[0] == 503]
    return {
        "rate": rate,
        "sent": len(answers),
        "admitted": len(admitted),
        "refused_503": len(refused),
        "refused_with_retry_after": sum(r[2] is not None for r in refused),
        "other_failures": sum(code not in (200, 503) for code, _, _ in answers),
        "admitted_p50_ms": 1000 * admitted[len(admitted) // 2] if admitted else None,
        "admitted_p99_ms": 1000 * admitted[min(len(admitted) - 1, int(0.99 * len(admitted)))] if admitted else None,
        "admitted_max_ms": 1000 * admitted[-1] if admitted else None,
        "refused_p99_ms": 1000 * sorted(r[1] for r in refused)[int(0.99 * (len(refused) - 1))] if refused else None,
        "admitted_per_second": len(admitted) / (time.perf_counter() - started),
    }


def overload_main(args) -> dict:
    from common import machine, write_results

    seconds, requests = (8.0, 16) if args.quick else (args.seconds, args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        (artifact,) = make_artifacts(args.model, Path(tmp), 1)
        server = Server([artifact], extra=["--max-queue", str(args.max_queue), "--timeout", "60"])
        try:
            clients = min(16, args.max_queue)  # closed loop within what the queue admits: no 503 while measuring
            capacity = load_test(server.port, requests, clients)["requests_per_second"]
            print(f"capacity at {clients} clients: {capacity:.2f} requests/s; sending {2 * capacity:.2f}/s", flush=True)
            result = overload_test(server.port, 2 * capacity, seconds)
        finally:
            server.close()
    result["capacity"] = capacity
    payload = {"machine": machine(), "model": args.model, "max_queue": args.max_queue, "seconds": seconds, **result}
    text = "\n".join(
        [
            "| quantity | value |",
            "|---|---|",
            f"| capacity ({min(16, args.max_queue)} clients, requests/s) | {capacity:.2f} |",
            f"| offered load (requests/s) | {result['rate']:.2f} (2x) |",
            f"| sent / admitted / refused 503 / other failures | {result['sent']} / {result['admitted']} / "
            f"{result['refused_503']} / {result['other_failures']} |",
            f"| admitted answered per second | {result['admitted_per_second']:.2f} |",
            f"| admitted latency p50 / p99 / max (ms) | {result['admitted_p50_ms']:.0f} / "
            f"{result['admitted_p99_ms']:.0f} / {result['admitted_max_ms']:.0f} |",
            f"| refused: with Retry-After, p99 time to refusal (ms) | {result['refused_with_retry_after']} of "
            f"{result['refused_503']}, {result['refused_p99_ms'] or 0:.0f} |",
        ]
    ) + (
        f"\n\nModel `{args.model}` (nf4, LoRA r=8, a classification head), `qadapters serve --max-queue "
        f"{args.max_queue} --timeout 60 --max-batch 32 --max-wait-ms 10` on localhost; single-text requests "
        f"arriving on a fixed schedule at twice the capacity measured just before, for {seconds:g} s."
    )
    name = "serve-overload" + ("-quick" if args.quick else "")
    write_results(name, payload, text, args.out)
    print(text)
    return payload


def _stream(port: int, name: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed completion: (seconds to the first text, total seconds, completion tokens)."""
    request = _json_request(
        port, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    )
    started, first, pieces = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=600) as answer:
        for raw in answer:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if text:
                first = first or time.perf_counter() - started
                pieces += 1
    return first or float("nan"), time.perf_counter() - started, pieces


def _complete(port: int, name: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One whole completion: (seconds, completion tokens from its usage)."""
    request = _json_request(port, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": max_tokens})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        usage = json.loads(answer.read())["usage"]
    return time.perf_counter() - started, usage["completion_tokens"]


def _parallel(calls: list, concurrency: int) -> tuple[list, float]:
    """Run the zero-argument ``calls`` on ``concurrency`` threads; their results and the wall time."""
    results: list = []
    lock, pending = threading.Lock(), list(calls)

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                call = pending.pop()
            value = call()
            with lock:
                results.append(value)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def _levels(port: int, names: list[str], prompts: list[str], tokens: int, per_level: int, clients: int) -> dict:
    """``per_level`` streamed completions from ``clients`` concurrent clients over the artifacts ``names``."""
    calls = [
        (lambda i=i: _stream(port, names[i % len(names)], prompts[i % len(prompts)], tokens)) for i in range(per_level)
    ]
    answers, wall = _parallel(calls, clients)
    firsts = sorted(a[0] for a in answers)
    return {
        "tokens_per_second": sum(a[2] for a in answers) / wall,
        "ttft_p50_ms": 1000 * firsts[len(firsts) // 2],
        "ttft_p99_ms": 1000 * firsts[min(len(firsts) - 1, int(0.99 * len(firsts)))],
        "requests": per_level,
        "clients": clients,
    }


def _generate_one_at_a_time(artifact: Path, prompts: list[str], tokens: int) -> float:
    """Tokens/s of ``transformers``' ``generate`` on ``artifact`` in this process, one prompt at a time (the
    bar a served client is held to)."""
    import torch

    import adapters

    model = adapters.load(artifact)
    network, tokenizer = model.backbone, model.tokenizer
    produced, started = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            batch = model.encode([prompt])
            out = network.generate(**batch, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            produced += out.shape[1] - batch["input_ids"].shape[1]
    return produced / (time.perf_counter() - started)


def _generate_batch(artifact: Path, prompts: list[str], tokens: int) -> dict:
    """``generate_batch`` (transformers' own continuous batching) on all of ``prompts`` in this process, where
    it runs on this model (its failure is recorded, not hidden)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    import adapters

    model = adapters.load(artifact)
    try:
        ids = [model.encode([p])["input_ids"][0].tolist() for p in prompts]
        config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=model.tokenizer.eos_token_id)
        # its paged cache sized for these prompts: by default it takes 90% of free memory, a GPU's sizing, which
        # on a CPU host is most of the RAM, zero-filled (15 of the 18 s of 4 prompts of 8 tokens, on 2 cores)
        pages = ContinuousBatchingConfig().page_size
        blocks = sum(-(-(len(row) + tokens) // pages) for row in ids)
        cache = ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=sum(map(len, ids)) + len(ids))
        started = time.perf_counter()
        with torch.inference_mode():
            outputs = model.backbone.generate_batch(
                inputs=ids, generation_config=config, continuous_batching_config=cache, progress_bar=False
            )
        generated = sum(len(o.generated_tokens) for o in outputs.values())
        return {"generate_batch_tokens_per_second": generated / (time.perf_counter() - started)}
    except Exception as err:  # noqa: BLE001 - reported beside, as the issue asks
        return {"generate_batch_error": f"{type(err).__name__}: {str(err)[:200]}"}


def _prefill_ms(artifact: Path, prompts: list[str], sizes: tuple[int, ...] = (1, 8, 16), repeats: int = 3) -> dict:
    """In this process, the milliseconds (median of ``repeats``) of one left-padded prefill forward of 1, 8 and
    16 of ``prompts`` together, as the scheduler runs it: the floor under the first token of a burst. On a CPU
    a prefill is compute, so the k-th of 16 simultaneous clients waits at least for k prompts' prefill,
    whatever the order."""
    import torch
    from transformers import DynamicCache

    import adapters
    from adapters.serving.scheduler import _cache_argument

    model = adapters.load(artifact)
    ids = [model.encode([p])["input_ids"][0].tolist() for p in prompts]

    def prefill(count: int) -> float:
        rows = [ids[i % len(ids)] for i in range(count)]
        width = max(map(len, rows))
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        started = time.perf_counter()
        inputs = {"input_ids": tokens, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
        inputs["past_key_values"] = DynamicCache()
        with torch.inference_mode():  # the cache under the name the model takes, as the scheduler passes it
            model.backbone(**_cache_argument(model.backbone, inputs), use_cache=True, logits_to_keep=1)
        return 1000 * (time.perf_counter() - started)

    prefill(1)  # the first forward pays one-off costs
    return {str(n): statistics.median(prefill(n) for _ in range(repeats)) for n in sizes}


def _generate_in_fresh_process(artifact: Path, prompts: list[str], tokens: int, warm: bool) -> float:
    """``_generate_one_at_a_time`` in a new process, as the served side runs in one (``warm``: ``run_child``'s)."""
    from common import run_child

    flags = ["--generate-in-process", str(artifact), "--max-tokens", str(tokens), "--prompts", json.dumps(prompts)]
    return float(run_child(__file__, flags, timeout=1800, warm=warm))


def _one_client_rounds(
    server_args: tuple,
    name: str,
    prompts: list[str],
    tokens: int,
    rounds: int,
    running: Server | None = None,
    warm: bool = False,
) -> dict:
    """One streaming client of artifact ``name`` on a fresh server (``server_args``: its artifacts and names)
    against ``generate`` on the same artifact in a fresh process, ``rounds`` times, alternating which goes
    first: on a shared 2-core VM two runs of one side differ by 10-30%, so one pair decides nothing.
    ``running``: a server of those artifacts already up, used instead of fresh ones (``--quick``: the code
    path, not the numbers); ``warm``: ``generate``'s process forked from a zygote (``--warm-start``)."""
    paths, names = server_args
    served: list[float] = []
    own: list[float] = []
    for r in range(rounds):
        for side in ("served", "generate") if r % 2 == 0 else ("generate", "served"):
            if side == "generate":
                own.append(_generate_in_fresh_process(paths[names.index(name)], prompts, tokens, warm))
                continue
            if running is not None:
                served.append(_levels(running.port, [name], prompts, tokens, len(prompts), 1)["tokens_per_second"])
                continue
            server = Server(paths, names=names)
            try:
                served.append(_levels(server.port, [name], prompts, tokens, len(prompts), 1)["tokens_per_second"])
            finally:
                server.close()
        print(f"one client, round {r + 1}: served {served[-1]:.1f}, generate {own[-1]:.1f} tokens/s", flush=True)
    return {
        "served_tokens_per_second": served,
        "generate_tokens_per_second": own,
        "ratio_of_medians": statistics.median(served) / statistics.median(own),
    }


def _generation_round(args, quantization: str | None, tmp: Path, tokens: int, per_level: int) -> dict:
    """One quantization: two LoRA chat artifacts and a classifier on one base, served; 1 client, 16
    clients over both adapters, 16 on one; the classifier's latency while 4 clients generate; then the same
    artifact in process."""
    import adapters

    prompts = [f"Review: {text}\nThe review says" for text in TEXTS]
    names = []
    for i in range(2):
        model = adapters.adapt(
            args.model,
            adapter=adapters.LoRA(r=8),
            seed=i,
            head=adapters.CausalLM(max_new_tokens=tokens),
            quantization=quantization,
            dtype="float32",  # the unquantized side is fp32 (not "auto", which picks bf16 where it measures faster)
        )
        model.save_pretrained(tmp / f"gen{i}-{quantization}")
        names.append(f"gen{i}")
    classifier = tmp / f"task-{quantization}"
    adapters.adapt(
        args.model, adapter=adapters.LoRA(r=8), head=adapters.Classification(labels=["neg", "pos"])
    ).save_pretrained(classifier)
    paths = [tmp / f"{n}-{quantization}" for n in names] + [classifier]
    server = Server(paths, names=[*names, "task0"])
    try:
        memory = server.rss_mb()
        clients = 4 if args.quick else 16
        levels = {
            "1 client": _levels(server.port, names, prompts, tokens, per_level // 2, 1),
            f"{clients} clients, 2 adapters": _levels(server.port, names, prompts, tokens, per_level, clients),
            f"{clients} clients, 1 adapter": _levels(server.port, names[:1], prompts, tokens, per_level, clients),
        }
        for level, row in levels.items():
            print(f"{quantization or 'fp32'} {level}: {row['tokens_per_second']:.1f} tokens/s", flush=True)
        idle = load_test(server.port, 16, 1)
        busy = [(lambda i=i: _complete(server.port, names[i % 2], prompts[0], tokens)) for i in range(8)]
        background = threading.Thread(target=_parallel, args=(busy, 4))
        background.start()
        time.sleep(1.0)
        loaded = load_test(server.port, 16, 1)
        background.join()
        one_client = (paths, [*names, "task0"]), names[0], (prompts * per_level)[: per_level // 2], tokens
        quick_one_client = _one_client_rounds(*one_client, 1, server, args.warm_start) if args.quick else None
    finally:
        server.close()
    return {
        "levels": levels,
        "memory_mb": memory,
        "classifier_p50_ms": {"idle": idle["p50_ms"], "during_generation": loaded["p50_ms"]},
        "one_client": quick_one_client or _one_client_rounds(*one_client, 3, warm=args.warm_start),
        "in_process": _generate_batch(paths[0], (prompts * per_level)[: per_level // 2], tokens),
        "prefill_ms": _prefill_ms(paths[0], prompts),
    }


def generation_main(args) -> dict:
    """Generative artifacts behind the OpenAI endpoints, fp32 and nf4 in one run: tokens/s and time to first
    token with 1 and 16 streaming clients (over two adapters, and over one), against one client and
    against ``transformers``' ``generate`` in process; ``generate_batch`` beside."""
    from common import machine, write_results

    per_level, tokens = (8, 8) if args.quick else (32, 24)
    quantizations = [None] if args.quick else [None, "nf4"]
    with tempfile.TemporaryDirectory() as tmp:
        rounds = {q or "fp32": _generation_round(args, q, Path(tmp), tokens, per_level) for q in quantizations}
    payload = {"machine": machine(), "model": args.model, "max_tokens": tokens, "rounds": rounds}
    text = _generation_table(payload, per_level)
    name = "serve-generation" + ("-quick" if args.quick else "")
    write_results(name, payload, text, args.out)
    print(text)
    return payload


def _generation_table(payload: dict, per_level: int) -> str:
    lines = [
        "| base | clients | tokens/s | x one client | first token p50 ms | x idle | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for quantization, result in payload["rounds"].items():
        one = result["levels"]["1 client"]
        for level, row in result["levels"].items():
            lines.append(
                f"| {quantization} | {level} | {row['tokens_per_second']:.1f} | "
                f"{row['tokens_per_second'] / one['tokens_per_second']:.2f} | {row['ttft_p50_ms']:.0f} | "
                f"{row['ttft_p50_ms'] / one['ttft_p50_ms']:.2f} | {row['ttft_p99_ms']:.0f} |"
            )
    lines += [
        "",
        "| base | served, 1 client (median) | generate in process (median) | ratio | rounds: served / generate | "
        "generate_batch in process |",
        "|---|---|---|---|---|---|",
    ]
    for quantization, result in payload["rounds"].items():
        one, batch = result["one_client"], result["in_process"].get("generate_batch_tokens_per_second")
        served, own = one["served_tokens_per_second"], one["generate_tokens_per_second"]
        pairs = ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(served, own, strict=True))
        lines.append(
            f"| {quantization} | {statistics.median(served):.1f} | {statistics.median(own):.1f} | "
            f"{one['ratio_of_medians']:.2f} | {pairs} | "
            + (f"{batch:.1f} |" if batch is not None else f"failed: {result['in_process']['generate_batch_error']} |")
        )
    lines += [
        "",
        "| base | one prefill forward in process: 1 prompt | 8 prompts | 16 prompts | 8 prompts x idle first token |",
        "|---|---|---|---|---|",
    ]
    for quantization, result in payload["rounds"].items():
        ms, idle = result["prefill_ms"], result["levels"]["1 client"]["ttft_p50_ms"]
        lines.append(
            f"| {quantization} | {ms['1']:.0f} ms | {ms['8']:.0f} ms | {ms['16']:.0f} ms | {ms['8'] / idle:.2f} |"
        )
    lines += [
        "",
        "| base | resident MB (2 generative artifacts + 1 classifier) | classifier p50 ms idle | while 4 generate |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {q} | {r['memory_mb']:.0f} | {r['classifier_p50_ms']['idle']:.0f} | "
        f"{r['classifier_p50_ms']['during_generation']:.0f} |"
        for q, r in payload["rounds"].items()
    ]
    lines += [
        "",
        f"Model `{payload['model']}` (LoRA r=8 CausalLM adapters, untrained: speed only), streamed "
        f"`/v1/completions` of up to {payload['max_tokens']} tokens (greedy), {per_level} requests per level "
        "(half for one client); tokens counted as streamed pieces. One client against `generate`: the first "
        "artifact served alone to one client (a fresh server of all three) and `generate` on it one prompt at a "
        "time in a fresh process, the same prompts, rounds alternating which goes first, medians. "
        "`generate_batch`: the same prompts at once, in process. Prefill: one forward of 1, 8 or 16 of the "
        "prompts together, as the scheduler prefills them (median of 3): half of 16 clients that ask at once "
        "cannot have a first token before 8 prompts' prefill is computed.",
    ]
    return "\n".join(lines)


class Server:
    def __init__(
        self, artifacts: list[Path], max_batch: int = 32, extra: list[str] | None = None, names: list[str] | None = None
    ):
        self.port = _free_port()
        names = names or [f"task{i}" for i in range(len(artifacts))]
        args = [f"{n}={p}" for n, p in zip(names, artifacts, strict=True)]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "adapters",
                "serve",
                *args,
                "--port",
                str(self.port),
                "--max-batch",
                str(max_batch),
                "--max-wait-ms",
                "10",
                *(extra or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    break
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("the server exited while starting") from None
                time.sleep(0.5)
        for name in names:  # warm: every artifact answers once
            if name.startswith("gen"):
                _complete(self.port, name, TEXTS[0], 2)
            else:
                _post(self.port, name, TEXTS[:2])

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def close(self):
        self.process.terminate()
        self.process.wait(60)


def load_test(port: int, requests: int, concurrency: int) -> dict:
    """``requests`` single-text requests from ``concurrency`` clients: requests/s and latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            seconds = _post(port, "task0", [TEXTS[i % len(TEXTS)]])
            with lock:
                latencies.append(seconds)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": wall,
        "requests_per_second": requests / wall,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def table(summary: dict) -> str:
    lines = ["| concurrency | requests/s | x one at a time | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    base = summary["throughput"]["1"]["requests_per_second"]
    for c, row in summary["throughput"].items():
        lines.append(
            f"| {c} | {row['requests_per_second']:.2f} | {row['requests_per_second'] / base:.2f} | "
            f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} |"
        )
    m = summary["memory"]
    lines += [
        "",
        "| served | resident MB | x one artifact |",
        "|---|---|---|",
        f"| 1 artifact | {m['one_mb']:.0f} | 1.00 |",
        f"| {m['count']} artifacts, one process, one base | {m['shared_mb']:.0f} "
        f"| {m['shared_mb'] / m['one_mb']:.2f} |",
        f"| {m['count']} artifacts, {m['count']} processes | {m['count'] * m['one_mb']:.0f} | {m['count']:.2f} |",
    ]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["throughput"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([int(c) for c in rows], [r["requests_per_second"] for r in rows.values()], marker="o")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("requests / s")
    left.set_title("throughput (one text per request)")
    m = summary["memory"]
    right.bar(
        ["1 artifact", f"{m['count']} on one base", f"{m['count']} processes"],
        [m["one_mb"], m["shared_mb"], m["count"] * m["one_mb"]],
    )
    right.set_ylabel("resident MB")
    right.set_title("memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests, one round")
    add_warm_start(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    p.add_argument("--overload", action="store_true", help="twice the capacity against a bounded queue instead")
    p.add_argument("--generation", action="store_true", help="the OpenAI endpoints' generation speed instead")
    p.add_argument("--max-queue", type=int, default=32, help="with --overload: the server's --max-queue")
    p.add_argument("--seconds", type=float, default=30.0, help="with --overload: how long the load lasts")
    p.add_argument("--generate-in-process", type=Path, help=argparse.SUPPRESS)  # one side of --generation
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.generate_in_process:
        print(_generate_one_at_a_time(args.generate_in_process, json.loads(args.prompts), args.max_tokens))
        return {}
    if args.overload:
        return overload_main(args)
    if args.generation:
        return generation_main(args)
    from common import RESULTS, machine, write_results

    rounds, requests = (1, 16) if args.quick else (args.rounds, args.requests)
    levels = [1, 4, 16]
    runs: dict = {"throughput": {str(c): [] for c in levels}, "one_mb": [], "shared_mb": []}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = make_artifacts(args.model, Path(tmp), 3)
        for r in range(rounds):
            order = [("one", artifacts[:1]), ("shared", artifacts)]
            for kind, served in order if r % 2 == 0 else order[::-1]:  # alternate which starts first
                server = Server(served)
                try:
                    runs[f"{kind}_mb"].append(server.rss_mb())
                    if kind == "one":
                        for c in levels:
                            runs["throughput"][str(c)].append(load_test(server.port, requests, c))
                            print(
                                f"round {r + 1}: concurrency {c}: "
                                f"{runs['throughput'][str(c)][-1]['requests_per_second']:.2f} requests/s",
                                flush=True,
                            )
                finally:
                    server.close()
            print(
                f"round {r + 1}: RSS one artifact {runs['one_mb'][-1]:.0f} MB, three on one base "
                f"{runs['shared_mb'][-1]:.0f} MB",
                flush=True,
            )
    summary = {
        "throughput": {
            c: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for c, rows in runs["throughput"].items()
        },
        "memory": {
            "count": 3,
            "one_mb": statistics.median(runs["one_mb"]),
            "shared_mb": statistics.median(runs["shared_mb"]),
        },
    }
    one = summary["throughput"]["1"]["requests_per_second"]
    summary["ratios"] = {
        "throughput_16_vs_1": summary["throughput"]["16"]["requests_per_second"] / one,
        "memory_3_shared_vs_1": summary["memory"]["shared_mb"] / summary["memory"]["one_mb"],
    }
    payload = {
        "machine": machine(),
        "model": args.model,
        "rounds": rounds,
        "requests": requests,
        "runs": runs,
        "summary": summary,
    }
    name = "serve" + ("-quick" if args.quick else "")
    out = Path(args.out) if args.out else RESULTS
    text = table(summary) + (
        f"\n\nModel `{args.model}` (nf4, LoRA r=8, classification heads), server `qadapters serve` "
        f"on localhost, `--max-batch 32 --max-wait-ms 10`; {requests} single-text requests per "
        f"concurrency level, {rounds} round(s), medians. RSS read after one warm-up request per "
        f"artifact."
    )
    write_results(name, payload, text, out)
    plot(summary, out / f"{name}.png")
    print(text)
    return payload


if __name__ == "__main__":
    main()
