"""Rows -> tensors for every head: datasets, targets, tokenization, padding.

Users hand us a ``datasets.Dataset`` or a list of dicts (checked here: one kind of value per
column, no NaN, so a bad row is named rather than failing deep in pyarrow). The encoders below turn
rows into model inputs; each head spec picks its own (``HeadSpec.encode``):

* text heads (classification, multi-label, regression): ``text`` -> tokens, ``label`` -> target;
  with ``long_text="windows"``, ``text`` -> overlapping windows of tokens, all kept;
* multiple choice: ``text`` (the context) paired with each of the row's ``choices``; scored by the
  base's likelihood, the choice follows the (prompted) context and the collator says which positions
  predict its tokens;
* token classification: ``text`` is a list of words, tokenized as pre-split words; each word's
  tag goes to its first sub-token, the other sub-tokens get ``IGNORE``;
* causal LM: ``prompt + response + eos`` (or chat ``messages`` through the chat template), the
  prompt's positions get ``IGNORE`` so the loss counts response tokens only.

Targets are checked against the head *before* tokenizing, so a bad row fails fast with its
index. Rows cut at ``max_length`` are counted and reported, never dropped silently. Padding is
dynamic (to the longest sequence of each batch), on the tokenizer's side.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from adapters.data.batching import pack, packing_pays
from adapters.data.turns import encode_turns
from adapters.errors import DataError


class Where(str):
    """What a set of rows is called in messages (``"evaluation rows"``), and where each row came from:
    ``row(i)`` is the file's own 1-based line for rows read from a file (``sources.Rows``), else the
    1-based row number."""

    origins: list[str] | None = None

    @classmethod
    def of(cls, what: str, data: Any) -> Where:
        where = cls(what)
        where.origins = getattr(data, "origins", None) or getattr(what, "origins", None)
        return where

    def row(self, i: int) -> str:
        if self.origins is not None and i < len(self.origins):
            return self.origins[i]
        return f"{self} row {i + 1}"


def _at(what: str, i: int) -> str:
    """Row ``i`` (0-based) of ``what``, as a user finds it: a file line or a 1-based row number."""
    return what.row(i) if isinstance(what, Where) else f"{what} row {i + 1}"


IGNORE = -100  # label of positions that take no part in a loss (padding, later sub-tokens, prompts)
logger = logging.getLogger("adapters")


def as_dataset(data: Any, what: str = "dataset"):
    """Accept a ``datasets.Dataset``, a dict of columns or an iterable of dicts; refuse an empty one."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        raise DataError(f"{what} is a DatasetDict with splits {list(data)}; pass one split, e.g. data['train']")
    if not isinstance(data, datasets.Dataset):
        if isinstance(data, dict):
            lengths = {name: len(values) for name, values in data.items()}
            if len(set(lengths.values())) > 1:
                raise DataError(f"{what}: its columns differ in length {lengths}; every column needs one value per row")
            rows = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)] if data else []
        else:
            rows = list(data)
            if rows and not all(isinstance(r, dict) for r in rows):
                raise DataError(
                    f"{what} must be a datasets.Dataset or a list of dicts, got rows of {type(rows[0]).__name__}"
                )
        origins = getattr(data, "origins", None)
        _check_column_types(rows, Where.of(what, data))
        try:
            data = datasets.Dataset.from_list(rows)
            data.origins = origins  # where each row came from, for messages (sources.Rows)
        except (TypeError, ValueError, ArithmeticError) as err:  # pyarrow's errors derive from these
            raise DataError(
                f"{what}: its rows cannot form a table ({type(err).__name__}: {err}); give every row "
                f"the same columns, each holding one kind of value"
            ) from None
    if len(data) == 0:
        raise DataError(f"{what} is empty: it needs at least one row")
    return data


def _value_type(value) -> str | None:
    """The kind of a cell as a table column sees it (None for a missing value)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number" if value == value else "NaN"  # NaN: an empty cell of a spreadsheet or pandas
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _check_column_types(rows: list[dict], what: str) -> None:
    """Refuse, with the row and column, a column mixing kinds of values (text and numbers, a NaN among
    texts): pyarrow would fail on it with neither."""
    first: dict[str, tuple[str, int]] = {}  # column -> (type of its first value, its row)
    for i, row in enumerate(rows):
        for column, value in row.items():
            found = _value_type(value)
            if found == "NaN":
                raise DataError(
                    f"{_at(what, i)}: column {column!r} is empty (NaN, not finite); fill it in or drop the row"
                )
            if found is None:
                continue
            seen = first.setdefault(column, (found, i))
            if seen[0] != found:
                raise DataError(
                    f"{_at(what, i)}: column {column!r} holds {found} ({value!r:.40}) but {_at(what, seen[1])} "
                    f"holds {seen[0]}; use one kind per column (e.g. all label names or all label ids)"
                )


def _column(data, name: str, what: str) -> list:
    if name not in data.column_names:
        raise DataError(
            f"{what} has no column {name!r}; its columns are {data.column_names}. Rename the column, or "
            f"name it: text_column=/label_column= (TrainConfig, evaluate), train.text_column/"
            f"train.label_column (YAML), --text-column/--label-column (qadapters eval); "
            f"choices_column=/messages_column= on the head"
        )
    return list(data[name])


def check_rows(data, head, text_column: str, label_column: str | None, what: str) -> None:
    """The checks encoding would make that need no tokenizer (columns present, every target valid for
    ``head``), so a bad file fails before a model is loaded."""
    data = as_dataset(data, what)
    what = Where.of(what, data)
    chat = head.lm_logits and text_column not in data.column_names and head.messages_column in data.column_names
    if not chat:
        for i, text in enumerate(_column(data, text_column, what)):
            if isinstance(text, str) and not text.strip():
                raise DataError(f"{_at(what, i)}: column {text_column!r} is empty; fill it in or drop the row")
        if label_column is not None:
            _targets(head, _column(data, label_column, what), what)


def _texts(values: list, column: str, what: str) -> list[str]:
    for i, text in enumerate(values):
        if not isinstance(text, str):
            raise DataError(f"{_at(what, i)}: column {column!r} holds {type(text).__name__}, not text")
        if not text.strip():
            raise DataError(f"{_at(what, i)}: column {column!r} is empty; fill it in or drop the row")
    return values


def _targets(head, values: list, what: str) -> list:
    out = []
    for i, value in enumerate(values):
        try:
            out.append(head.target(value))
        except DataError as err:
            raise DataError(f"{_at(what, i)}: {err}") from None
    return out


def _truncated(encoding) -> int:
    return sum(bool(e.overflowing) for e in encoding.encodings) if encoding.encodings else 0


def encode_rows(
    data, tokenizer, head, text_column: str, label_column: str | None, max_length: int, what: str
) -> tuple[dict[str, list], int]:
    """Encode ``data`` for ``head``: a dict of columns (input_ids, attention_mask, labels) and the
    number of rows truncated to ``max_length``. Without ``label_column`` no targets are read. How a
    row is encoded is the head's choice (``HeadSpec.encode``: texts, text windows, choices, words,
    prompt and response)."""
    data = as_dataset(data, what)
    return head.encode(data, tokenizer, text_column, label_column, max_length, Where.of(what, data))


def _token_columns(encoded) -> list[str]:
    return [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]


def encode_texts(
    data, tokenizer, head, text_column: str, label_column: str | None, max_length: int, what: str
) -> tuple[dict[str, list], int]:
    """One sequence per text, cut at ``max_length``; or, for heads with ``long_text="windows"``, every
    text as overlapping windows of ``max_length`` tokens (nothing dropped)."""
    labels = _targets(head, _column(data, label_column, what), what) if label_column else None
    texts = _texts(_column(data, text_column, what), text_column, what)
    prompt_cut = 0
    if head.prompt is not None:
        texts, prompt_cut = fit_prompt(tokenizer, head.prompt, texts, max_length)
    if head.reads_windows():
        # the tokenizer's stride is the overlap between consecutive windows
        overlap = head.window_overlap if head.window_overlap is not None else max_length // 4
        if overlap >= max_length - 2:
            raise DataError(
                f"window_overlap={overlap} must be smaller than max_length={max_length} minus special tokens"
            )
        encoded = tokenizer(
            texts, truncation=True, max_length=max_length, stride=overlap, return_overflowing_tokens=True
        )
        keys = _token_columns(encoded)
        out: dict[str, list[list]] = {key: [[] for _ in texts] for key in keys}
        for window, row in enumerate(encoded["overflow_to_sample_mapping"]):
            for key in keys:
                out[key][row].append(encoded[key][window])
        cut = 0
    else:
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        cut = max(_truncated(encoded), prompt_cut)
    if labels is not None:
        out["labels"] = labels
    return out, cut


def fit_prompt(tokenizer, template: str, texts: list[str], max_length: int) -> tuple[list[str], int]:
    """``texts`` inside ``template`` (``{text}`` marks the place), each cut so the whole fits in
    ``max_length`` tokens, and how many were cut. Truncation must cut the text, not the template: a
    decoder reads the task from the words after ``{text}`` (its cue, "Sentiment:"), and plain
    truncation drops exactly those from a long text. A text that fits is left exactly as the
    template puts it (tokenized whole, as without this step)."""
    prompted = [template.replace("{text}", t) for t in texts]
    lengths = [len(ids) for ids in tokenizer(prompted)["input_ids"]]
    cut = 0
    for i, (text, length) in enumerate(zip(texts, lengths, strict=False)):
        if length <= max_length:
            continue
        cut += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(ids) - (length - max_length)
        while keep > 0:  # a cut can re-tokenize differently at the seams: shorten until it fits
            prompted[i] = template.replace("{text}", tokenizer.decode(ids[:keep]))
            over = len(tokenizer(prompted[i])["input_ids"]) - max_length
            if over <= 0:
                break
            keep -= over
        if keep <= 0:
            raise DataError(
                f"the prompt {template!r} alone takes about {length - len(ids)} tokens, which leaves no "
                f"room for the text in max_length={max_length}; raise max_length or shorten the prompt"
            )
    return prompted, cut


def encode_choices(
    data, tokenizer, head, text_column: str, label_column: str | None, max_length: int, what: str
) -> tuple[dict[str, list], int]:
    """A context and ``head.num_choices`` candidates per row: one (context, candidate) pair per choice."""
    labels = _targets(head, _column(data, label_column, what), what) if label_column else None
    texts = _texts(_column(data, text_column, what), text_column, what)
    choices = _column(data, head.choices_column, what)
    k = head.num_choices
    for i, row in enumerate(choices):
        if not isinstance(row, (list, tuple)) or len(row) != k or not all(isinstance(c, str) for c in row):
            raise DataError(
                f"{_at(what, i)}: column {head.choices_column!r} must hold {k} candidate texts, got {row!r}"
            )
    if head.scoring == "likelihood":
        out, cut = _encode_scored_choices(tokenizer, head, texts, choices, max_length)
    else:
        if head.prompt is not None:
            texts = head.prompted(texts)
        flat = tokenizer(
            [t for t in texts for _ in range(k)],
            [c for row in choices for c in row],
            truncation=True,
            max_length=max_length,
        )
        out = {key: [flat[key][i * k : (i + 1) * k] for i in range(len(texts))] for key in _token_columns(flat)}
        cut = len({i // k for i, e in enumerate(flat.encodings or []) if e.overflowing})
    if labels is not None:
        out["labels"] = labels
    return out, cut


def _encode_scored_choices(
    tokenizer, head, texts: list[str], choices: list[list[str]], max_length: int
) -> tuple[dict[str, list], int]:
    """Each choice right after its (prompted) context, one space between, as the base would write it;
    ``choice_start`` says where the choice's tokens begin (the collator turns it into the positions
    that predict them). The context is cut to leave room for the row's longest choice."""
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "choice_start": []}
    cut = 0
    for text, row in zip(texts, choices, strict=False):
        ends = [tokenizer(c if c.startswith(" ") else " " + c, add_special_tokens=False)["input_ids"] for c in row]
        room = max(1, max_length // 2)  # a choice longer than half the room is cut
        long_choice = any(len(e) > room for e in ends)
        ends = [ids[:room] for ids in ends]
        context, was_cut = fit_prompt(tokenizer, head.prompt or "{text}", [text], max_length - max(map(len, ends)))
        cut += bool(was_cut or long_choice)
        start = tokenizer(context[0])["input_ids"]
        if not start:
            raise DataError(f"an empty context ({text!r}): a choice's first token needs a token before it to be scored")
        out["input_ids"].append([start + e for e in ends])
        out["attention_mask"].append([[1] * (len(start) + len(e)) for e in ends])
        out["choice_start"].append([len(start)] * len(ends))
    return out, cut


def encode_words(
    data: Any,
    tokenizer: Any,
    head: Any,
    text_column: str,
    label_column: str | None,
    max_length: int,
    what: str,
) -> tuple[dict[str, list[Any]], int]:
    """Pre-split words per row; a tag per word goes to its first sub-token, the others get ``IGNORE``."""
    words = _column(data, text_column, what)
    for i, row in enumerate(words):
        if isinstance(row, str) or not isinstance(row, (list, tuple)) or not all(isinstance(w, str) for w in row):
            raise DataError(
                f"{_at(what, i)}: column {text_column!r} must hold a list of words for token "
                f"classification, got {row!r:.80}"
            )
    tags = _targets(head, _column(data, label_column, what), what) if label_column else None
    if tags is not None:
        for i, (w, t) in enumerate(zip(words, tags, strict=False)):
            if len(w) != len(t):
                raise DataError(f"{_at(what, i)}: {len(w)} words but {len(t)} tags; they must line up one to one")
    encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    cut = 0
    if tags is not None:
        out["labels"] = []
        for i, row_tags in enumerate(tags):
            word_ids = encoded.word_ids(i)
            labels, previous = [], None
            for wid in word_ids:
                labels.append(row_tags[wid] if wid is not None and wid != previous else IGNORE)
                previous = wid
            out["labels"].append(labels)
            cut += max((w for w in word_ids if w is not None), default=-1) + 1 < len(row_tags)
    else:
        cut = _truncated(encoded)
    return out, cut


_said_system: set[int] = set()


def _say_default_system_prompt(tokenizer: Any, head: Any, data: Any, what: str) -> None:
    """Say once per tokenizer when its chat template puts a default system prompt into chats that have
    none (SmolLM2's does): those tokens are trained on and count against max_length, unasked."""
    if head.system_prompt is not None or id(tokenizer) in _said_system:
        return
    if all(first.get("role") == "system" for first in _firsts(data, head)):
        return
    _said_system.add(id(tokenizer))
    added = template_system_tokens(tokenizer)
    if added:
        logger.warning(
            "%s: the chat template adds its own default system prompt (%d tokens) to every chat without one; "
            "set CausalLM(system_prompt='...') to choose it ('' for an empty one)",
            what,
            added,
        )


def prompts_and_responses(
    data: Any, tokenizer: Any, head: Any, text_column: str, label_column: str
) -> tuple[list[str] | None, list[str]]:
    """For generation metrics: the rows' plain prompts (None for chat rows, which generate from their
    messages) and their reference responses (a chat's last, the assistant's, message)."""
    what = Where("evaluation rows")
    _, responses = _prompt_response(data, tokenizer, head, text_column, label_column, what)
    if head.messages_column in data.column_names and text_column not in data.column_names:
        return None, responses or []
    return _texts(_column(data, text_column, what), text_column, what), responses or []


def _prompt_response(data, tokenizer, head, text_column, label_column, what) -> tuple[list[str], list[str] | None]:
    if head.messages_column in data.column_names and (text_column not in data.column_names):
        prompts, responses = [], []
        for i, messages in enumerate(_column(data, head.messages_column, what)):
            if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise DataError(
                    f"{_at(what, i)}: {head.messages_column!r} must be a list of {{'role', 'content'}} dicts"
                )
            messages = _with_system(head, messages)
            if label_column is not None:
                if messages[-1]["role"] != "assistant":
                    raise DataError(f"{_at(what, i)}: the last message must be the assistant's answer to learn")
                responses.append(messages[-1]["content"])
                messages = messages[:-1]
            prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        _say_default_system_prompt(tokenizer, head, data, what)
        return prompts, responses if label_column is not None else None
    texts = _texts(_column(data, text_column, what), text_column, what)
    return texts, (_targets(head, _column(data, label_column, what), what) if label_column else None)


def encode_causal(
    data: Any,
    tokenizer: Any,
    head: Any,
    text_column: str,
    label_column: str | None,
    max_length: int,
    what: str,
) -> tuple[dict[str, list[Any]], int]:
    """Prompt then response (with EOS); the loss counts response tokens only. Too long: the prompt's
    start is cut, the part nearest the answer is kept."""
    # a chat template already holds its special tokens; a plain prompt gets the tokenizer's own
    templated = head.messages_column in data.column_names and text_column not in data.column_names
    if templated and label_column is not None and not head.mask_history:
        return _encode_every_turn(data, tokenizer, head, text_column, label_column, max_length, what)
    prompts, responses = _prompt_response(data, tokenizer, head, text_column, label_column, what)
    prompt_ids = tokenizer(prompts, add_special_tokens=not templated)["input_ids"]
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    cut_rows: list[int] = []
    for i, prompt in enumerate(prompt_ids):
        response = []
        if responses is not None:
            response = tokenizer(responses[i], add_special_tokens=False)["input_ids"]
            response = response + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        ids = prompt + response
        if len(ids) > max_length:  # keep the response and the end of the prompt: the part nearest the answer
            cut_rows.append(i)
            ids = ids[-max_length:]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        if responses is not None:
            n_prompt = len(ids) - min(len(response), len(ids))
            out["labels"].append([IGNORE] * n_prompt + ids[n_prompt:])
    if responses is None:
        del out["labels"]
    if cut_rows:
        named = ", ".join(_at(what, i) for i in cut_rows[:3]) + (" ..." if len(cut_rows) > 3 else "")
        logger.warning(
            "%s: the start of the prompt was cut in %d row(s) longer than max_length=%d (%s); the answer is kept "
            "whole. Raise max_length, or shorten the prompts%s",
            what,
            len(cut_rows),
            max_length,
            named,
            " (a chat template's own default system prompt counts too: see CausalLM(system_prompt=...))"
            if templated and head.system_prompt is None and any(f.get("role") != "system" for f in _firsts(data, head))
            else "",
        )
    return out, len(cut_rows)


def _encode_every_turn(
    data: Any, tokenizer: Any, head: Any, text_column: str, label_column: str, max_length: int, what
):
    """Chats with every assistant message learned (``CausalLM(mask_history=False)``, see ``turns``)."""
    _prompt_response(data, tokenizer, head, text_column, label_column, what)  # the same checks and warning
    messages = [_with_system(head, m) for m in _column(data, head.messages_column, what)]
    out, cut_rows = encode_turns(tokenizer, messages, max_length, lambda i: _at(what, i), IGNORE)
    if cut_rows:
        logger.warning(
            "%s: the start of %d chat(s) longer than max_length=%d was cut (%s); the latest turns are kept. "
            "Raise max_length, or shorten the chats",
            what,
            len(cut_rows),
            max_length,
            ", ".join(_at(what, i) for i in cut_rows[:3]) + (" ..." if len(cut_rows) > 3 else ""),
        )
    return out, len(cut_rows)


def _with_system(head: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if head.system_prompt is not None and messages[0]["role"] != "system":
        return [{"role": "system", "content": head.system_prompt}, *messages]
    return messages


def _firsts(data: Any, head: Any) -> list[dict[str, Any]]:
    """The first message of every chat row."""
    return [m[0] if m else {} for m in data[head.messages_column]]


def template_system_tokens(tokenizer: Any) -> int:
    """Tokens a chat template adds as its own system prompt to a chat that has none (0: it adds none)."""
    user = {"role": "user", "content": "x"}
    try:
        bare = tokenizer.apply_chat_template([user], tokenize=False)
        empty = tokenizer.apply_chat_template([{"role": "system", "content": ""}, user], tokenize=False)
    except Exception:  # noqa: BLE001 - a template without a system role adds none either
        return 0
    return max(0, _token_count(tokenizer, bare) - _token_count(tokenizer, empty))


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_dataset(data, tokenizer, head, text_column: str, label_column: str | None, max_length: int, what: str):
    """``encode_rows`` as a ``datasets.Dataset``, logging how many rows were truncated."""
    import datasets

    columns, cut = encode_rows(data, tokenizer, head, text_column, label_column, max_length, what)
    if cut:
        logger.warning(
            "%s: %d of %d rows were longer than max_length=%d tokens and were truncated",
            what,
            cut,
            len(columns["input_ids"]),
            max_length,
        )
    dataset = datasets.Dataset.from_dict(columns)
    dataset.truncated_rows = cut
    return dataset


class Collator:
    """Encoded rows -> one padded batch, on the tokenizer's padding side.

    The layout of a batch is the head's (``HeadSpec.collate``: windows, choices, per-token labels); this
    class gives it the padding (``pad``, ``sequences``, ``nested``). Plain rows of decoders can instead be
    packed without padding (``pack=True``, where ``batching.packing_pays``; the caller checks
    ``batching.packable``). Without a head, rows are one sequence each with one label each.
    """

    def __init__(self, tokenizer, head=None, pack: bool = False):
        self.tokenizer = tokenizer
        self.head = head
        self.pack = pack

    def pad(self, sequences: list[list[int]], value: int) -> torch.Tensor:
        """``sequences`` padded with ``value`` to the longest, on the tokenizer's side."""
        longest = max(len(s) for s in sequences)
        left = self.tokenizer.padding_side == "left"
        return torch.tensor(
            [[value] * (longest - len(s)) + s if left else s + [value] * (longest - len(s)) for s in sequences]
        )

    def _pads(self) -> dict[str, int]:
        return {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}

    def sequences(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Token columns of rows holding one sequence each, padded: (rows, length)."""
        return {key: self.pad([r[key] for r in rows], pad) for key, pad in self._pads().items() if key in rows[0]}

    def nested(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Token columns of rows holding a list of sequences each, flattened in order and padded together:
        (sum of the rows' sequences, length)."""
        return {
            key: self.pad([seq for r in rows for seq in r[key]], pad)
            for key, pad in self._pads().items()
            if key in rows[0]
        }

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        # an empty text (no tokens) has no segment to pool: such a batch stays padded
        if self.pack and min(lengths) > 0 and packing_pays(lengths):
            batch = pack([r["input_ids"] for r in rows], self.tokenizer.pad_token_id)
            return {**batch, **({"labels": torch.tensor([r["labels"] for r in rows])} if "labels" in rows[0] else {})}
        if self.head is not None:
            return self.head.collate(rows, self)
        return {
            **self.sequences(rows),
            **({"labels": torch.tensor([r["labels"] for r in rows])} if "labels" in rows[0] else {}),
        }
