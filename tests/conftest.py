"""Session fixtures: the tiny random models of ``helpers.py`` (a 2-layer Llama and a 2-layer BERT,
hidden 64), built once per worker, so every test runs offline in seconds."""

from __future__ import annotations

import os

# tests never need the network: fail fast instead of waiting on hub retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# one thread per process: the tiny test models are all synchronisation and no arithmetic, so a second
# OpenMP thread only adds waiting (the README's Tests section has the measured difference);
# subprocesses (torchrun, the CLI, benchmarks) inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the CPU's compute dtype by default is measured per machine (backbone/precision.py): the suite pins fp32
# so that its tolerances hold on every CI machine, and tests the bf16 path by asking for it
os.environ.setdefault("QADAPTERS_CPU_BF16", "0")

import pytest
import torch

from tests.helpers import build_tiny, llama_config, save_tiny, tokenizer_for, toy_sentiment


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_chat_llama(tiny_llama, tmp_path_factory) -> str:
    """The tiny Llama with a chat template that renders every turn of ``messages`` after the ones before it."""
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("tiny-chat-llama") / "base"
    shutil.copytree(tiny_llama, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    tokenizer.save_pretrained(base)
    return str(base)


@pytest.fixture(scope="session")
def tied_llama(tmp_path_factory) -> str:
    """The tiny Llama with tied input and output embeddings, as SmolLM2 has."""
    from transformers import LlamaForCausalLM

    _, vocab = tokenizer_for(bert=False)
    torch.manual_seed(0)
    config = llama_config(vocab, tie_word_embeddings=True)
    return save_tiny(LlamaForCausalLM(config), tmp_path_factory.mktemp("tied-llama"), bert=False)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(params=["llama", "bert"])
def tiny_model(request, tiny_llama, tiny_bert) -> str:
    return tiny_llama if request.param == "llama" else tiny_bert


@pytest.fixture
def toy_data():
    return toy_sentiment(48), toy_sentiment(24, seed=1)


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    """Two generative LoRA adapters (``gen_a``, ``gen_b``, each trained to one answer) and a classifier on one
    tiny base whose chat template renders ``messages``, loaded for serving; and their paths."""
    import shutil

    from transformers import AutoTokenizer

    import adapters
    from adapters.serving.backbones import load_served
    from tests.openai_fixtures import ANSWERS, PROMPT, TEMPLATE

    root = tmp_path_factory.mktemp("openai")
    base = root / "base"
    shutil.copytree(tiny_llama, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE  # the base's chat template renders `messages`
    tokenizer.save_pretrained(base)
    for name, answer in ANSWERS.items():
        model = adapters.adapt(
            str(base), adapter=adapters.LoRA(r=8, dropout=0.0), head=adapters.CausalLM(max_new_tokens=3)
        )
        rows = [{"text": PROMPT, "label": answer}] * 16
        adapters.train(model, rows, None, adapters.TrainConfig(epochs=20, lr=1e-2, batch_size=8, progress=False))
        model.save_pretrained(root / name)
    classifier = adapters.adapt(
        str(base), adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["neg", "pos"])
    )
    adapters.train(classifier, toy_sentiment(16), None, adapters.TrainConfig(max_steps=1, progress=False))
    classifier.save_pretrained(root / "sentiment")
    paths = {name: root / name for name in (*ANSWERS, "sentiment")}
    return load_served(paths), paths


@pytest.fixture(scope="module")
def client(served):
    """The ``openai`` client on FastAPI's test client of ``served``, and the test client itself."""
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient

    from adapters.serving.server import create_app

    with TestClient(create_app(served[0])) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http), http
