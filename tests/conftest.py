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
