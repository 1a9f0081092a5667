"""Tiny random models built in-test (a 2-layer Llama and a 2-layer BERT, hidden 64), saved as
normal HF folders with a word-level tokenizer, so every test runs offline in seconds.

Hidden size 64 = one bitsandbytes 4-bit quantization block per row.
"""

from __future__ import annotations

import os
import random

# tests never need the network: fail fast instead of waiting on hub retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# one thread per process: the tiny test models are all synchronisation and no arithmetic, so a second
# OpenMP thread only adds waiting (measured: the fast suite 335 s with 2 threads, 88 s with 1, on 2 cores);
# subprocesses (torchrun, the CLI, benchmarks) inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

WORDS = ("good great fun moving wonderful superb bad awful boring dull tedious mess "
         "a the film movie is was and but not very plot story acting").split()
POSITIVE, NEGATIVE = WORDS[:6], WORDS[6:12]
FILLER = WORDS[12:]


def _tokenizer(bert: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    kwargs = {"cls_token": "[CLS]", "sep_token": "[SEP]"} if bert else {"eos_token": "[SEP]"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", **kwargs), len(vocab)


def save_tiny(model, path, bert: bool) -> str:
    """Save a randomly initialised model with the word-level tokenizer as an HF folder."""
    tokenizer, _ = _tokenizer(bert)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_tiny(kind: str, path) -> str:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    _, vocab_size = _tokenizer(bert=kind == "bert")
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             pad_token_id=0, eos_token_id=3, bos_token_id=None)
        model = LlamaForCausalLM(config)  # with its LM head: AutoModel loads the body alone
    else:
        config = BertConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
        model = BertModel(config)
    return save_tiny(model, path, bert=kind == "bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tied_llama(tmp_path_factory) -> str:
    """The tiny Llama with tied input and output embeddings, as SmolLM2 has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, vocab = _tokenizer(bert=False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                         eos_token_id=3, bos_token_id=None, tie_word_embeddings=True)
    return save_tiny(LlamaForCausalLM(config), tmp_path_factory.mktemp("tied-llama"), bert=False)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(params=["llama", "bert"])
def tiny_model(request, tiny_llama, tiny_bert) -> str:
    return tiny_llama if request.param == "llama" else tiny_bert


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


@pytest.fixture
def toy_data():
    return toy_sentiment(48), toy_sentiment(24, seed=1)
