"""The field's own clients, at their defaults, against ``qadapters serve``: lm-eval's ``local-completions``
(a ``multiple_choice`` and a ``generate_until`` task from a local JSON file) beside lm-eval's in-process ``hf``
model with the same PEFT adapter, and guidellm's streaming chat at 1, 4 and 16 concurrent streams.

lm-eval and guidellm are not dependencies of qadapters (they pin their own torch and friends): install them in
a venv of their own and point ``--clients`` at its ``bin`` folder::

    python -m venv /tmp/clients && /tmp/clients/bin/pip install torch==2.13.0 "lm-eval[api]==0.4.13" guidellm==0.8.1
    python benchmarks/clients.py --clients /tmp/clients/bin

The server runs in fp32 (``QADAPTERS_CPU_BF16=0``) so that its logprobs can be compared with lm-eval's ``hf``
model in fp32. Results: ``benchmarks/results/clients.{md,json}`` with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTIONS = [  # (question, choices, index of the right one)
    ("The MIT licence is", ["permissive", "copyleft"], 0),
    ("The GPL-3.0 licence is", ["permissive", "copyleft"], 1),
    ("Apache-2.0 is a", ["permissive", "copyleft"], 0),
    ("AGPL-3.0 is a", ["permissive", "copyleft"], 1),
    ("The BSD-3-Clause licence is", ["permissive", "copyleft"], 0),
    ("LGPL-2.1 is a weak", ["copyleft", "permissive"], 0),
    ("The capital of France is", ["Paris", "Berlin"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit"], 0),
    ("The sun rises in the", ["east", "west"], 0),
    ("A week has seven", ["days", "months"], 0),
    ("Two plus two equals", ["four", "five"], 0),
    ("The opposite of hot is", ["cold", "warm"], 0),
]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{question}}}}"
"""
MC = (
    'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
    "metric_list:\n  - metric: acc\n"
)
GEN = (
    'output_type: generate_until\ndoc_to_target: "{{choices[answer]}}"\ngeneration_kwargs:\n  until: ["\\n", "."]\n'
    "  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n    ignore_case: true\n"
)


def artifact(work: Path) -> Path:
    """A chat LoRA on the packaged SmolLM2-135M in fp32 (a few steps: the point is the client path, not its
    skill)."""
    import adapters

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Is MIT permissive? ({i})"},
                {"role": "assistant", "content": "Yes."},
            ]
        }
        for i in range(32)
    ]
    lora = adapters.LoRA(r=8, dropout=0.0)  # on the unquantized base, as lm-eval's hf model loads it
    model = adapters.adapt("smollm2-135m", adapter=lora, head=adapters.CausalLM(), quantization=None)
    adapters.train(model, rows, None, adapters.TrainConfig(max_steps=8, lr=2e-4, batch_size=4, progress=False))
    model.save_pretrained(work / "chat")
    return work / "chat"


def tasks(work: Path) -> Path:
    folder = work / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    data = work / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "qa_mc.yaml").write_text(TASK.format(name="qa_mc", data=data) + MC)
    (folder / "qa_gen.yaml").write_text(TASK.format(name="qa_gen", data=data) + GEN)
    return folder


def serve(path: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "QADAPTERS_CPU_BF16": "0"}
    cmd = [sys.executable, "-m", "adapters", "serve", f"chat={path}", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise RuntimeError("the server did not start")


def lm_eval(clients: Path, model_args: str, model: str, task_names: str, folder: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(clients / "lm_eval"), "--model", model, "--model_args", model_args, "--tasks", task_names]
    cmd += ["--include_path", str(folder), "--output_path", str(out), "--log_samples"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in task_names.split(","):
        rows = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        samples[task] = [[float(r[0][0]) for r in row["resps"]] for row in rows] if task == "qa_mc" else []
    return {"results": results, "loglikelihoods": samples.get("qa_mc", [])}


def guidellm(clients: Path, port: int, base: Path, streams: int, requests: int, out: Path) -> dict:
    cmd = [
        str(clients / "guidellm"), "run", "--backend", f"kind=openai_http,target=http://127.0.0.1:{port},model=chat",
        "--profile", f"kind=concurrent,streams={streams}", "--constraint", f"kind=max_requests,count={requests}",
        "--tokenizer", f"kind=huggingface_auto,model={base}",
        "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=32",
        "--output", f"kind=json,path={out}", "--disable-console-interactive",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    bench = json.loads(out.read_text())["benchmarks"][0]
    state, metrics = bench["scheduler_state"], bench["metrics"]

    def median(name: str) -> float:
        return metrics[name]["successful"]["median"]

    return {
        "streams": streams,
        "successful": state["successful_requests"],
        "errored": state["errored_requests"],
        "output_tokens_per_s": metrics["output_tokens_per_second"]["successful"]["mean"],
        "ttft_ms_median": median("time_to_first_token_ms"),
        "itl_ms_median": median("inter_token_latency_ms"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=Path, required=True, help="the bin folder with lm_eval and guidellm")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qadapters-clients"))
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    from adapters.backbone.packaged import resolve_packaged
    from benchmarks.common import machine, write_results

    base = resolve_packaged("smollm2-135m")
    path, folder = artifact(args.work), tasks(args.work)
    server = serve(path, args.port)
    try:
        url = f"model=chat,base_url=http://127.0.0.1:{args.port}/v1/completions,tokenizer={base}"
        served = lm_eval(args.clients, url, "local-completions", "qa_mc,qa_gen", folder, args.work / "lm-served")
        sweep = [guidellm(args.clients, args.port, base, s, 4 * s, args.work / f"guide-{s}.json") for s in (1, 4, 16)]
    finally:
        server.terminate()
        server.wait()
    peft = f"pretrained={base},peft={path / 'adapter'},dtype=float32"
    local = lm_eval(args.clients, peft, "hf", "qa_mc", folder, args.work / "lm-hf")
    pairs = zip(served["loglikelihoods"], local["loglikelihoods"], strict=True)
    gap = max(abs(a - b) for x, y in pairs for a, b in zip(x, y, strict=True))
    payload = {"machine": machine(), "lm_eval_served": served, "lm_eval_hf": local, "max_loglikelihood_gap": gap}
    payload["guidellm"] = sweep
    lines = [
        "lm-eval 0.4.13 `local-completions` at its defaults against `qadapters serve` (SmolLM2-135M, unquantized,",
        "with a chat LoRA, fp32), beside lm-eval's in-process `hf` model with the same PEFT adapter:",
        "",
        "| task | served | in-process hf |",
        "|---|---|---|",
        f"| qa_mc acc | {served['results']['qa_mc']['acc,none']:.4f} | {local['results']['qa_mc']['acc,none']:.4f} |",
        f"| qa_gen exact_match | {served['results']['qa_gen']['exact_match,none']:.4f} | - |",
        "",
        f"Largest gap between the two sides' loglikelihoods over every choice: {gap:.2e}.",
        "",
        "guidellm 0.8.1 at its defaults (streaming chat, synthetic 64-token prompts, 32 output tokens):",
        "",
        "| streams | successful | errored | output tokens/s | TTFT median (ms) | ITL median (ms) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['streams']} | {r['successful']} | {r['errored']} | {r['output_tokens_per_s']:.1f} "
            f"| {r['ttft_ms_median']:.0f} | {r['itl_ms_median']:.0f} |"
            for r in sweep
        ),
    ]
    print(write_results("clients", payload, "\n".join(lines)).read_text())


if __name__ == "__main__":
    main()
