"""Loaders of the prompt file formats (PAIR CSV, Psych8k JSON, CSV, JSON Lines, Hugging Face datasets); a malformed
row raises :class:`~emorl.utils.EmorlError` naming the file and line before any training starts."""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from emorl.data.records import Record
from emorl.utils import EmorlError

PAIR_COLUMNS = ("prompt", "hq1", "hq2", "mq1", "lq1", "lq2", "lq3", "lq4", "lq5")


def existing_file(path: str | Path, source: str) -> Path:
    """The data file as a Path, or an error naming ``data.path`` when it is missing or a folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EmorlError(f"data.path: {p} does not exist (data.source={source}); fix the path")
    if p.is_dir():
        raise EmorlError(f"data.path: {p} is a folder; data.source={source} needs a file "
                         "(a folder saved with datasets' save_to_disk needs data.source=hf)")
    return p


def _record(where: str, row: Mapping[str, Any], prompt_field: str, reference_field: str | None) -> Record:
    """Build one Record from a row; errors start with ``where`` (``file:line``) and say what to change."""
    if prompt_field not in row:
        raise EmorlError(f"{where}: no {prompt_field!r} field (found: {', '.join(map(str, row)) or 'none'}); "
                         "set data.prompt_field to the field holding the client statement")
    prompt = row[prompt_field]
    if not isinstance(prompt, str):
        raise EmorlError(f"{where}: {prompt_field!r} must be a string, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise EmorlError(f"{where}: empty prompt ({prompt_field!r}); fill it in or delete the row")
    reference = None
    if reference_field is not None:
        if reference_field not in row:
            raise EmorlError(f"{where}: no {reference_field!r} field (found: {', '.join(map(str, row))}); "
                             "set data.reference_field to an existing field, or null")
        ref = row[reference_field]
        if ref is not None and not isinstance(ref, str):
            raise EmorlError(f"{where}: {reference_field!r} must be a string or null, "
                             f"got {type(ref).__name__}")
        reference = (ref or "").strip() or None
    return Record(prompt, reference)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line of the row, fields) for every non-blank CSV row; quoted fields may span lines."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            start = 1
            try:
                for row in reader:
                    if any(c.strip() for c in row):
                        yield start, row
                    start = reader.line_num + 1
            except csv.Error as e:
                raise EmorlError(f"{path}:{start}: malformed CSV ({e}); check the quotes on that line") from None
    except UnicodeDecodeError as e:
        raise EmorlError(f"{path}: not UTF-8 text ({e}); re-save the file as UTF-8") from None


def load_csv_records(path: str | Path, prompt_field: str = "prompt",
                     reference_field: str | None = None) -> list[Record]:
    """A CSV with a header row naming the columns."""
    path = Path(path)
    rows = _csv_rows(path)
    header_line, header = next(rows, (1, []))
    if not header:
        raise EmorlError(f"{path}: empty file; a CSV needs a header row (e.g. '{prompt_field}') and data rows")
    header = [h.strip() for h in header]
    for field in (prompt_field, reference_field):
        if field is not None and field not in header:
            key = "prompt_field" if field == prompt_field else "reference_field"
            raise EmorlError(f"{path}:{header_line}: the header has no column {field!r} (columns: "
                             f"{', '.join(header)}); set data.{key} to one of them")
    out = []
    for line, row in rows:
        if len(row) != len(header):
            raise EmorlError(f"{path}:{line}: {len(row)} fields, but the header has {len(header)}; quote fields "
                             "that contain commas (\"...\") or fix the row")
        out.append(_record(f"{path}:{line}", dict(zip(header, row, strict=True)), prompt_field, reference_field))
    return out


def load_pair_csv(path: str | Path, seed: int = 0) -> list[Record]:
    """The PAIR CSV: rows of ``prompt, hq1, hq2, mq1, lq1..lq5`` (a header row is tolerated).

    As the reference loader: one record per unique prompt (first occurrence), whose reference is one of the
    row's high-quality reflections chosen at random with ``seed`` (references are never used by rewards).
    """
    path = Path(path)
    rng = random.Random(seed)
    out: list[Record] = []
    seen: set[str] = set()
    for n, (line, row) in enumerate(_csv_rows(path)):
        if n == 0 and row[0].strip().lower() == "prompt":
            continue  # header row
        if len(row) != len(PAIR_COLUMNS):
            hint = " (DynaOpt's file has an extra 'topic' column: delete it)" if len(row) == 10 else ""
            raise EmorlError(f"{path}:{line}: {len(row)} fields, a PAIR row needs {len(PAIR_COLUMNS)} "
                             f"({', '.join(PAIR_COLUMNS)}){hint}; quote fields that contain commas")
        rec = _record(f"{path}:{line}", dict(zip(PAIR_COLUMNS, row, strict=True)), "prompt", None)
        if rec.prompt in seen:
            continue
        seen.add(rec.prompt)
        hqs = [h.strip() for h in row[1:3] if h.strip()]
        out.append(Record(rec.prompt, rng.choice(hqs) if hqs else None))
    return out


_WS = re.compile(r"[ \t\n\r]*")


def _json_items(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, item) of a JSON array file or of a JSON Lines file (one value per line; blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise EmorlError(f"{path}: not UTF-8 text ({e}); re-save the file as UTF-8") from None
    pos = _WS.match(text).end()  # type: ignore[union-attr]
    if text[pos:pos + 1] != "[":
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise EmorlError(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno}); fix or delete "
                                     "that line (JSON Lines: one object per line)") from None
        return
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text[pos:pos + 1] == "]":
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                item, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise EmorlError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            yield line, item
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            sep, pos = text[pos:pos + 1], _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            if sep == "]":
                break
            if sep != "," or text[pos:pos + 1] == "]":
                at = line + text.count("\n", counted, pos)
                raise EmorlError(f"{path}:{at}: not valid JSON (expected ',' between items or ']' at the end; "
                                 "a trailing comma is not allowed)")
    if pos < len(text):
        raise EmorlError(f"{path}:{text.count(chr(10), 0, pos) + 1}: extra text after the end of the JSON array")


def load_json_records(path: str | Path, prompt_field: str = "prompt",
                      reference_field: str | None = None) -> list[Record]:
    """A JSON array of objects (Psych8k: ``input`` / ``output``) or a JSON Lines file."""
    path = Path(path)
    out = []
    for line, item in _json_items(path):
        if not isinstance(item, dict):
            raise EmorlError(f"{path}:{line}: expected an object like {{\"{prompt_field}\": \"...\"}}, "
                             f"got {type(item).__name__}")
        out.append(_record(f"{path}:{line}", item, prompt_field, reference_field))
    return out


def load_hf(path: str, prompt_field: str = "prompt", reference_field: str | None = None,
            split: str = "train") -> list[Record]:
    """A Hugging Face dataset: a folder written by ``save_to_disk``, else a hub name (needs a network)."""
    try:
        import datasets
    except ImportError as e:
        raise EmorlError(f"data.source=hf needs the 'datasets' package (pip install datasets): {e}") from None
    folder = Path(path).expanduser()
    if folder.is_dir():
        try:
            ds = datasets.load_from_disk(str(folder))
        except Exception as e:  # noqa: BLE001 - datasets raises several types for a bad folder
            raise EmorlError(f"data.path: {folder} is not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise EmorlError(f"{folder}: no split {split!r} (splits: {', '.join(ds)}); set data.hf_split")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as e:  # noqa: BLE001 - network, auth, missing dataset or split all land here
            raise EmorlError(
                f"could not load the Hugging Face dataset {path!r} (split {split!r}): {type(e).__name__}: {e}. "
                "Loading by name needs a network (HF_DATASETS_OFFLINE unset) and a valid name; without one, save "
                "it once elsewhere with `datasets.load_dataset(...).save_to_disk(FOLDER)` and set data.path to "
                "FOLDER") from None
    columns = list(ds.column_names)
    for field, key in ((prompt_field, "prompt_field"), (reference_field, "reference_field")):
        if field is not None and field not in columns:
            raise EmorlError(f"{path}: the dataset has no column {field!r} (columns: {', '.join(columns)}); set "
                             f"data.{key} to one of them")
    prompts = ds[prompt_field]
    refs = ds[reference_field] if reference_field else [None] * len(prompts)
    return [_record(f"{path} row {i}", {prompt_field: p, **({reference_field: r} if reference_field else {})},
                    prompt_field, reference_field) for i, (p, r) in enumerate(zip(prompts, refs, strict=True), 1)]
