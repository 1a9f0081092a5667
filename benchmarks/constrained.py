"""Which constrained-decoding library the server's ``response_format`` uses, chosen by measurement on CPU.

For each library (xgrammar, llguidance, lm-format-enforcer), in fresh processes, alternating, ``--reps`` times:
the tokenizer's setup, the first JSON schema's compile and first mask (a cold server's first request), a second
schema's compile and first mask on the warm tokenizer (every later request), and the steady time to fill and
apply one token mask while following a valid answer, on SmolLM2's tokenizer (49,152 tokens). Medians go to
``benchmarks/results/constrained.{md,json}`` with the CPU named.

    python benchmarks/constrained.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 49152
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "spdx_id": {"type": "string"},
            "category": {"type": "string", "enum": ["permissive", "copyleft", "weak copyleft"]},
            "osi": {"type": "boolean"},
        },
        "required": ["spdx_id", "category", "osi"],
    },
    {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}, "score": {"type": "number"}},
        "required": ["label", "score"],
    },
]
ANSWER = {"spdx_id": "Apache-2.0", "category": "permissive", "osi": True}


def _tokenizer():
    from transformers import AutoTokenizer

    from adapters.backbone.packaged import resolve_packaged

    return AutoTokenizer.from_pretrained(resolve_packaged("smollm2-135m"))


def _xgrammar(tok, ids):
    import torch
    import xgrammar as xgr

    started = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB))
    setup = time.perf_counter() - started
    mask, logits = xgr.allocate_token_bitmask(1, VOCAB), torch.randn(1, VOCAB)

    def first(schema):
        started = time.perf_counter()
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
        matcher.fill_next_token_bitmask(mask)
        return matcher, time.perf_counter() - started

    def step(matcher, token):
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        assert matcher.accept_token(token)

    return setup, first, step


def _llguidance(tok, ids):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lgt
    import torch

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB)
    setup = time.perf_counter() - started
    mask, logits = lgt.allocate_token_bitmask(1, VOCAB), torch.randn(1, VOCAB)

    def first(schema):
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
        lgt.fill_next_token_bitmask(matcher, mask, 0)
        return matcher, time.perf_counter() - started

    def step(matcher, token):
        lgt.fill_next_token_bitmask(matcher, mask, 0)
        lgt.apply_token_bitmask_inplace(logits, mask)
        assert matcher.consume_token(token)

    return setup, first, step


def _lm_format_enforcer(tok, ids):
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer
    from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data

    started = time.perf_counter()
    data = build_token_enforcer_tokenizer_data(tok)
    setup = time.perf_counter() - started

    def first(schema):
        started = time.perf_counter()
        enforcer = TokenEnforcer(data, JsonSchemaParser(schema))
        enforcer.get_allowed_tokens([])
        return (enforcer, []), time.perf_counter() - started

    def step(state, token):
        enforcer, seq = state
        assert token in enforcer.get_allowed_tokens(seq)
        seq.append(token)

    return setup, first, step


LIBRARIES = {"xgrammar": _xgrammar, "llguidance": _llguidance, "lm-format-enforcer": _lm_format_enforcer}


def measure(library: str) -> dict:
    """One fresh process's figures for ``library`` (seconds)."""
    tok = _tokenizer()
    ids = tok(json.dumps(ANSWER), add_special_tokens=False)["input_ids"]
    setup, first, step = LIBRARIES[library](tok, ids)
    _, cold = first(SCHEMAS[0])
    matcher, warm = first(SCHEMAS[1] | {"title": "another"})
    matcher, _ = first(SCHEMAS[0] | {"title": "again"})
    started = time.perf_counter()
    for token in ids:
        step(matcher, token)
    per_token = (time.perf_counter() - started) / len(ids)
    return {"setup_s": setup, "first_schema_s": cold, "next_schema_s": warm, "per_token_s": per_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one library's figures as JSON
        try:
            print(json.dumps(measure(args.one)))
        except Exception as err:  # noqa: BLE001 - a library that fails is reported, not fatal to the table
            print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
        return
    runs: dict[str, list[dict]] = {name: [] for name in LIBRARIES}
    for _ in range(args.reps):
        for name in LIBRARIES:  # alternating, each in a fresh process
            out = subprocess.run(
                [sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True, cwd=Path.cwd()
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    from benchmarks.common import machine

    write(runs, machine())


def write(runs: dict[str, list[dict]], machine: dict) -> None:
    from benchmarks.common import write_results

    lines = [
        f"Constrained decoding, SmolLM2's tokenizer ({VOCAB} tokens), medians of {len(next(iter(runs.values())))} "
        "fresh processes each.",
        "",
        "| library | tokenizer setup | first schema + first mask | next schema + first mask | per token |",
        "|---|---|---|---|---|",
    ]
    table = {}
    for name, reps in runs.items():
        errors = [r["error"] for r in reps if "error" in r]
        if errors:
            lines.append(f"| {name} | fails: {errors[0][:120]} | | | |")
            table[name] = {"error": errors[0]}
            continue
        med = {key: statistics.median(r[key] for r in reps) for key in reps[0]}
        table[name] = med
        lines.append(
            f"| {name} | {med['setup_s'] * 1e3:.0f} ms | {med['first_schema_s'] * 1e3:.0f} ms "
            f"| {med['next_schema_s'] * 1e3:.1f} ms | {med['per_token_s'] * 1e6:.0f} us |"
        )
    write_results("constrained", {"machine": machine, "runs": runs, "medians": table}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
