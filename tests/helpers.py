"""What the tests build, in one place: tiny random models saved as HF folders (a 2-layer Llama and a
2-layer BERT, hidden 64: one bitsandbytes 4-bit block per row) with a word-level tokenizer, and toy
rows for every head kind. ``conftest.py`` turns the models into session fixtures; test modules import
the rest from here (never from each other)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import adapters

WORDS = (
    "good great fun moving wonderful superb bad awful boring dull tedious mess "
    "a the film movie is was and but not very plot story acting"
).split()


POSITIVE, NEGATIVE = WORDS[:6], WORDS[6:12]


FILLER = WORDS[12:]


def tokenizer_for(bert: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    kwargs = {"cls_token": "[CLS]", "sep_token": "[SEP]"} if bert else {"eos_token": "[SEP]"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", **kwargs), len(vocab)


def save_tiny(model, path, bert: bool) -> str:
    """Save a randomly initialised model with the word-level tokenizer as an HF folder."""
    tokenizer, _ = tokenizer_for(bert)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def llama_config(vocab_size: int, **overrides):
    """The tiny Llama's shape: 2 layers, hidden 64 (one bitsandbytes 4-bit block per row), 4 heads."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=None,
    )
    return LlamaConfig(**{**settings, **overrides})


def build_tiny(kind: str, path) -> str:
    from transformers import BertConfig, BertModel, LlamaForCausalLM

    _, vocab_size = tokenizer_for(bert=kind == "bert")
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(llama_config(vocab_size))  # with its LM head: AutoModel loads the body alone
    else:
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            pad_token_id=0,
        )
        model = BertModel(config)
    return save_tiny(model, path, bert=kind == "bert")


def toy_sentiment(n: int, seed: int = 0) -> list[dict]:
    """Short texts whose label is decided by the sentiment words they contain."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(FILLER, rng.randint(1, 5))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _words(rng, n_pos, n_neg):
    words = rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, n_neg) + rng.sample(FILLER, rng.randint(1, 3))
    rng.shuffle(words)
    return words


def _counted_rows(n, seed, label):
    """Texts with 0-2 positive and 0-2 negative words; ``label(n_pos, n_neg)`` is the target."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        n_pos, n_neg = rng.randint(0, 2), rng.randint(0, 2)
        rows.append({"text": " ".join(_words(rng, n_pos, n_neg)), "label": label(n_pos, n_neg)})
    return rows


def multilabel_rows(n, seed=0):
    return _counted_rows(n, seed, lambda p, q: (["pos"] if p else []) + (["neg"] if q else []))


def regression_rows(n, seed=0):
    return _counted_rows(n, seed, lambda p, q: float(p - q))


def choice_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        context = " ".join(rng.sample(POSITIVE if positive else NEGATIVE, 2) + rng.sample(FILLER, 2))
        right = rng.choice(POSITIVE if positive else NEGATIVE)
        wrong = rng.sample(NEGATIVE if positive else POSITIVE, 2)
        answer = rng.randrange(3)
        choices = wrong[:answer] + [right] + wrong[answer:]
        rows.append({"text": context, "choices": choices, "label": answer})
    return rows


def tag_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = _words(rng, rng.randint(0, 2), rng.randint(0, 2))
        tags = ["B-POS" if w in POSITIVE else "B-NEG" if w in NEGATIVE else "O" for w in words]
        rows.append({"text": words, "label": tags})
    return rows


def long_rows(n, seed=0, filler=30):
    """The sentiment word comes last, after ``filler`` words: past the first window."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(FILLER) for _ in range(filler)] + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def rows_of(columns: dict[str, list]) -> list[dict]:
    """Encoded columns (``encode_rows``) as one dict per row, what a collator takes."""
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def causal_rows(n, seed=0):
    rng = random.Random(seed)
    return [{"text": " ".join(rng.sample(FILLER, 3)), "label": rng.choice(POSITIVE)} for _ in range(n)]


# One example of every head kind: a head, rows to train it on, and unlabeled inputs to predict. The
# contract battery (test_contract.py) runs each registered kind through it, so a new head kind must add
# its example here.
HEAD_EXAMPLES = {
    "classification": (lambda: adapters.Classification(labels=["neg", "pos"]), toy_sentiment),
    "multi_label": (lambda: adapters.MultiLabel(labels=["pos", "neg"]), multilabel_rows),
    "regression": (lambda: adapters.Regression(), regression_rows),
    "multiple_choice": (lambda: adapters.MultipleChoice(num_choices=3), choice_rows),
    "token_classification": (lambda: adapters.TokenClassification(labels=["O", "B-POS", "B-NEG"]), tag_rows),
    "causal_lm": (lambda: adapters.CausalLM(max_new_tokens=2), causal_rows),
}


def example_inputs(rows: list[dict]) -> list:
    """What ``predict`` takes for these rows (the head's raw inputs, without labels)."""
    if "choices" in rows[0]:
        return [{"context": r["text"], "choices": r["choices"]} for r in rows]
    return [r["text"] for r in rows]


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``make(folder)`` once per test session, also across pytest-xdist workers
    (pytest-xdist's own recipe for a fixture that must run once: the first worker to ask makes it under a file
    lock, the others wait, then read it). For the slow tier's reference runs, each a subprocess launch that two
    workers would otherwise both pay for. The tiny models are built from a fixed seed, so every worker's copy
    is the same bytes and a run made from one worker's copy is the run another worker would make."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # one folder for all workers of this session
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


def one_after_another(runs: dict[Path, list[str]]) -> list[str]:
    """``tests/ddp_worker.py``'s options for ``runs`` (each output folder with the rest of its options), trained
    one after another in one launch: ``--then`` between them. Makes each folder."""
    options: list[str] = []
    for out, rest in runs.items():
        out.mkdir(parents=True, exist_ok=True)
        options += [*(["--then"] if options else []), "--out", str(out), *rest]
    return options


DDP_WORKER = Path(__file__).with_name("ddp_worker.py")


def launch_ddp_worker(processes: int, options: list[str], expect: int = 0) -> str:
    """``tests/ddp_worker.py`` with ``options`` under ``torchrun --standalone`` on ``processes`` processes, one
    thread each; asserts its exit code (``expect``) and returns what it printed."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(DDP_WORKER), *options], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout
