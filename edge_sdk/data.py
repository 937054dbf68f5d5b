"""Where a device's private and held-out data come from, described in its config file:

    {"file": "train.parquet"}                   a data file or a `datasets` directory (below)
    {"texts_file": "notes.txt"}                 one sample per line
    {"jsonl_file": "pairs.jsonl"}               {"text": ...} or {"prompt": ..., "response": ...}
                                                per line
    {"zoo_domain": "computers", "split": "private", "shard": [0, 3], "limit": 200}
                                                the project's bundled domains (demo, tests)

A ``"file"`` spec reads JSON Lines (``.jsonl``, ``.ndjson``), JSON (``.json``: an array of
objects, or JSON Lines), CSV / TSV (``.csv``, ``.tsv``, with a header row), Parquet
(``.parquet``, ``.pq``), plain text (``.txt``, one sample per non-blank line) or a Hugging Face
``datasets`` directory written by ``save_to_disk``; ``"format"`` names the format when the
extension does not (``jsonl``, ``json``, ``csv``, ``tsv``, ``parquet``, ``text``, ``datasets``).
Parquet and ``datasets`` directories need the ``data`` extra (``pip install 'cotune[data]'``).

Which columns hold the samples:

- ``"text_column"``: plain texts;
- ``"prompt_column"`` / ``"response_column"`` (defaults ``"prompt"`` / ``"response"``), with an
  optional ``"system_column"``: instruction pairs;
- ``"messages_column"`` (default ``"messages"``): chat conversations, lists of
  ``{"role": "system"|"user"|"assistant", "content": ...}`` (a JSON string in CSV); the last
  assistant turn is the response, everything before it the prompt;
- none of these: ``prompt`` + ``response`` if the file has both, else ``messages``, else
  ``text``.

``"split"`` picks the split of a ``datasets`` directory that holds several (a ``DatasetDict``).
``"limit"`` keeps the first N samples. ``"chat_template": "never"`` keeps the plain
``prompt + response + eos`` form for the pairs even when the model's tokenizer has a chat
template (``"auto"``, the default, uses the template; see ``algorithms.core.textdata``).

Every problem with a spec or its data raises :class:`DataSpecError`, naming the file and, for a
bad value, its line (JSON Lines, CSV) or row (counted from 1).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DataSpecError(ValueError):
    pass


EXTRA_HINT = "pip install 'cotune[data]'"

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "text", "datasets")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
}
_COLUMN_KEYS = (
    "text_column",
    "prompt_column",
    "response_column",
    "system_column",
    "messages_column",
)
_FILE_KEYS = {"file", "format", "split", "limit", "chat_template", *_COLUMN_KEYS}
_SOURCE_KEYS = ("file", "texts_file", "jsonl_file", "zoo_domain")
_CHAT_TEMPLATE_MODES = ("auto", "never")  # as algorithms.core.textdata.CHAT_TEMPLATE_MODES


def load_samples(spec: dict | None, base: Path | None = None) -> list:
    """The samples a data spec describes: strings (plain texts) or ``{"prompt", "response"}``
    dicts (with ``"system"`` when there is one), ready for ``TokenizedDataset``."""
    if not spec:
        return []
    if not isinstance(spec, dict):
        raise DataSpecError(f"a data spec is a JSON object, got {type(spec).__name__}")
    base = base or Path(".")
    limit = spec.get("limit")
    if limit is not None:
        try:
            if isinstance(limit, (bool, float)) or int(limit) < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise DataSpecError(f"'limit' must be a whole number >= 0, got {limit!r}") from None
        limit = int(limit)
    mode = spec.get("chat_template", "auto")
    if mode not in _CHAT_TEMPLATE_MODES:
        raise DataSpecError(
            f"'chat_template' must be one of {list(_CHAT_TEMPLATE_MODES)}, got {mode!r}"
        )
    if "file" in spec:
        others = [k for k in _SOURCE_KEYS if k in spec and k != "file"]
        if others:
            raise DataSpecError(f"data spec names two sources, 'file' and {others[0]!r}; give one")
        unknown = sorted(set(spec) - _FILE_KEYS)
        if unknown:
            raise DataSpecError(
                f"unknown key(s) {unknown} in a 'file' data spec; known: {sorted(_FILE_KEYS)}"
            )
        items = _load_file(spec, base, limit)
    elif "texts_file" in spec:
        p = base / spec["texts_file"]
        items = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif "jsonl_file" in spec:
        items = _load_legacy_jsonl(base / spec["jsonl_file"])
    elif "zoo_domain" in spec:
        from algorithms.zoo.datasets import client_shards, domain_split

        split = spec.get("split", "private")
        if "shard" in spec:
            index, count = spec["shard"]
            if split != "private":
                raise DataSpecError("shards are cut from the private split only")
            items = client_shards(spec["zoo_domain"], int(count), int(spec.get("seed", 0)))[
                int(index)
            ]
        else:
            items = domain_split(spec["zoo_domain"], split)
    else:
        raise DataSpecError(
            f"unknown data spec {spec!r}: use file, texts_file, jsonl_file or zoo_domain"
        )
    items = list(items[: int(limit)] if limit else items)
    if mode == "never":
        items = [
            {**x, "chat_template": "never"} if isinstance(x, dict) and "prompt" in x else x
            for x in items
        ]
    return items


def _jsonl_rows(path: Path):
    """(line number, parsed value) of every non-blank line of a JSON Lines file."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSpecError(f"{path}, line {n}: not valid JSON ({e.msg})") from None


def _load_legacy_jsonl(path: Path) -> list:
    items: list = []
    for n, row in _jsonl_rows(path):
        if isinstance(row, dict) and "text" in row:
            items.append(_string(row["text"], path, f"line {n}", "text"))
        elif isinstance(row, dict) and "prompt" in row and "response" in row:
            items.append(
                {
                    "prompt": _string(row["prompt"], path, f"line {n}", "prompt"),
                    "response": _string(row["response"], path, f"line {n}", "response"),
                }
            )
        else:
            raise DataSpecError(f"{path}, line {n}: expected 'text' or 'prompt'+'response'")
    return items


# ---------------------------------------------------------------------------------------------
# "file" specs


class _Table:
    """A data file's column names, its number of rows, ``fetch(columns, limit)`` giving the
    first ``limit`` rows (all when None) as dicts, and how to name row ``i`` in errors."""

    def __init__(
        self,
        columns: list[str],
        num_rows: int,
        fetch: Callable[[list[str], int | None], list[dict]],
        label: Callable[[int], str],
    ):
        self.columns, self.num_rows, self.fetch, self.label = columns, num_rows, fetch, label

    @classmethod
    def of_rows(cls, rows: list[dict], columns: list[str], label: Callable[[int], str]) -> _Table:
        return cls(columns, len(rows), lambda _cols, limit: rows[:limit], label)


def _format(spec: dict, path: Path) -> str:
    fmt = spec.get("format")
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataSpecError(f"unknown data format {fmt!r}; use one of {list(FORMATS)}")
        return fmt
    if path.is_dir():
        return "datasets"
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataSpecError(
            f'{path}: can\'t tell the format from the extension {path.suffix!r}; set "format" '
            f"to one of {list(FORMATS)}"
        )
    return fmt


def _load_file(spec: dict, base: Path, limit: int | None) -> list:
    path = base / spec["file"]
    if not path.exists():
        raise DataSpecError(f"data file not found: {path}")
    fmt = _format(spec, path)
    if "split" in spec and fmt != "datasets":
        raise DataSpecError(f"{path}: 'split' applies to a datasets directory only, not to {fmt}")
    if fmt == "datasets":
        if not path.is_dir():
            raise DataSpecError(
                f"{path}: format 'datasets' wants a directory written by save_to_disk"
            )
    elif path.is_dir():
        raise DataSpecError(f"{path} is a directory, not a {fmt} file")
    if fmt == "text":
        if any(k in spec for k in _COLUMN_KEYS):
            raise DataSpecError(f"{path}: a text file has one sample per line and no columns")
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    readers = {
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_csv,
        "tsv": _read_csv,
        "parquet": _read_parquet,
        "datasets": _read_datasets,
    }
    table = readers[fmt](path, spec, fmt)
    if not table.num_rows:
        raise DataSpecError(f"{path} has no rows")
    kind, cols = _columns(spec, table.columns, path)
    rows = table.fetch(list(cols.values()), int(limit) if limit else None)
    return [_sample(kind, cols, row, table.label(i), path) for i, row in enumerate(rows)]


def _columns(spec: dict, present: list[str], path: Path) -> tuple[str, dict[str, str]]:
    """(kind, {role: column}) with kind "text", "pairs" or "messages"."""

    def need(cols: dict[str, str]) -> dict[str, str]:
        for role, col in cols.items():
            if col not in present:
                raise DataSpecError(
                    f"{path}: no column {col!r} (the {role} column); its columns are {present}"
                )
        return cols

    given = [k for k in _COLUMN_KEYS if k in spec]
    for k in given:
        if not isinstance(spec[k], str) or not spec[k]:
            raise DataSpecError(f"{k!r} must be a column name, got {spec[k]!r}")
    pair_keys = {"prompt_column", "response_column", "system_column"}
    for kind in ("text", "messages"):
        key = f"{kind}_column"
        if key in spec:
            if len(given) > 1:
                rest = [k for k in given if k != key]
                raise DataSpecError(f"{key!r} can't be combined with {rest}")
            return kind, need({kind: spec[key]})
    if pair_keys & set(given):
        cols = {
            "prompt": spec.get("prompt_column", "prompt"),
            "response": spec.get("response_column", "response"),
        }
        if "system_column" in spec:
            cols["system"] = spec["system_column"]
        return "pairs", need(cols)
    if "prompt" in present and "response" in present:
        return "pairs", {"prompt": "prompt", "response": "response"}
    if "messages" in present:
        return "messages", {"messages": "messages"}
    if "text" in present:
        return "text", {"text": "text"}
    raise DataSpecError(
        f"{path}: found no sample columns ('prompt' + 'response', 'messages' or 'text'); its "
        f"columns are {present}. Name them with text_column, prompt_column/response_column or "
        "messages_column"
    )


def _string(value: Any, path: Path, where: str, col: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise DataSpecError(f"{path}, {where}: column {col!r} is empty (null)")
    raise DataSpecError(
        f"{path}, {where}: column {col!r} holds {type(value).__name__} {value!r:.60}, not a string"
    )


def _sample(kind: str, cols: dict[str, str], row: dict, where: str, path: Path) -> Any:
    for col in cols.values():
        if col not in row:
            raise DataSpecError(f"{path}, {where}: no {col!r} (this row has {sorted(row)})")
    if kind == "text":
        return _string(row[cols["text"]], path, where, cols["text"])
    if kind == "pairs":
        out = {
            "prompt": _string(row[cols["prompt"]], path, where, cols["prompt"]),
            "response": _string(row[cols["response"]], path, where, cols["response"]),
        }
        if "system" in cols and row[cols["system"]] not in (None, ""):
            out["system"] = _string(row[cols["system"]], path, where, cols["system"])
        return out
    col = cols["messages"]
    messages = row[col]
    if isinstance(messages, str):  # CSV cells, or a column of JSON strings
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise DataSpecError(
                f"{path}, {where}: column {col!r} is not a JSON list of messages ({e.msg})"
            ) from None
    from algorithms.core.errors import DataError
    from algorithms.core.textdata import split_conversation

    try:
        return split_conversation(messages)
    except DataError as e:
        raise DataSpecError(f"{path}, {where}: column {col!r}: {e}") from None


def _read_jsonl(path: Path, spec: dict, fmt: str) -> _Table:
    rows: list[dict] = []
    lines: list[int] = []
    for n, row in _jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataSpecError(
                f"{path}, line {n}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
        lines.append(n)
    return _Table.of_rows(rows, _union(rows), lambda i: f"line {lines[i]}")


def _read_json(path: Path, spec: dict, fmt: str) -> _Table:
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_jsonl(path, spec, fmt)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataSpecError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataSpecError(
                f"{path}, row {i + 1}: expected a JSON object, got {type(row).__name__}"
            )
    return _Table.of_rows(rows, _union(rows), lambda i: f"row {i + 1}")


def _union(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _read_csv(path: Path, spec: dict, fmt: str) -> _Table:
    rows: list[dict] = []
    lines: list[int] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
        columns = list(reader.fieldnames or [])
        if not columns:
            raise DataSpecError(f"{path} is empty (a {fmt.upper()} file needs a header row)")
        for row in reader:
            if None in row:
                raise DataSpecError(
                    f"{path}, line {reader.line_num}: more fields than the header's {len(columns)}"
                )
            if any(v is None for v in row.values()):
                raise DataSpecError(
                    f"{path}, line {reader.line_num}: fewer fields than the header's {len(columns)}"
                )
            rows.append(row)
            lines.append(reader.line_num)
    return _Table.of_rows(rows, columns, lambda i: f"line {lines[i]}")


def _read_parquet(path: Path, spec: dict, fmt: str) -> _Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataSpecError(f"reading Parquet ({path}) needs pyarrow: {EXTRA_HINT}") from None
    try:
        meta = pq.ParquetFile(path)
        columns, num_rows = list(meta.schema_arrow.names), meta.metadata.num_rows
    except Exception as e:  # pyarrow's errors for a file that is not Parquet
        raise DataSpecError(f"{path}: can't read it as Parquet ({e})") from None

    def fetch(cols: list[str], limit: int | None) -> list[dict]:
        table = pq.read_table(path, columns=cols)
        return (table if limit is None else table.slice(0, limit)).to_pylist()

    return _Table(columns, num_rows, fetch, lambda i: f"row {i + 1}")


def _read_datasets(path: Path, spec: dict, fmt: str) -> _Table:
    try:
        import datasets
    except ImportError:
        raise DataSpecError(
            f"reading a datasets directory ({path}) needs the datasets package: {EXTRA_HINT}"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataSpecError(f"{path}: not a directory written by save_to_disk ({e})") from None
    split = spec.get("split")
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None and len(names) != 1:
            raise DataSpecError(f'{path} holds the splits {names}; pick one with "split"')
        name = names[0] if split is None else split
        if name not in ds:
            raise DataSpecError(f"{path} has no split {name!r}; its splits are {names}")
        ds = ds[name]
    elif split is not None:
        raise DataSpecError(f'{path} holds a single dataset, not splits; drop "split": {split!r}')

    def fetch(cols: list[str], limit: int | None) -> list[dict]:
        part = ds.select_columns(cols)
        if limit is not None and limit < len(part):
            part = part.select(range(limit))
        return part.to_list() if hasattr(part, "to_list") else list(part)

    return _Table(list(ds.column_names), len(ds), fetch, lambda i: f"row {i + 1}")
