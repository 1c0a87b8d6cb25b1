"""Prompt data: records, the built-in emotional-support task, file loaders, deterministic splits, and the
formatting of a client statement into the model's input text.

Loaders raise :class:`~emorl.utils.EmorlError` naming the file and line of a malformed row before any
training starts. Sources (``DataConfig.source``):

- ``default``: :func:`default_records` — statements written for emorl plus emotional turns from chitchat-dataset.
- ``pair``: the PAIR CSV (9 columns; one record per unique prompt, reference = one seeded-random hq reflection).
- ``psych8k``: Psych8k JSON (``input`` -> prompt, ``output`` -> reference).
- ``csv`` / ``jsonl``: any file with ``prompt_field`` (and optionally ``reference_field``) columns or keys.
- ``hf``: a Hugging Face dataset saved with ``save_to_disk`` (a folder), or a hub name (needs a network).

Formatting and tokenising a statement for the model lives in :mod:`emorl.prompts` (re-exported here).
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import json
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emorl.config import DataConfig
from emorl.prompts import PromptText, encode_prompts, fit_prompts, format_prompts  # noqa: F401 - re-exported
from emorl.utils import EmorlError

log = logging.getLogger(__name__)

SUPPORT_PROMPTS = Path(__file__).parent / "assets" / "support_prompts.jsonl"
PAIR_COLUMNS = ("prompt", "hq1", "hq2", "mq1", "lq1", "lq2", "lq3", "lq4", "lq5")
SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class Record:
    """One prompt: the client's statement and an optional reference reply (never used by rewards)."""

    prompt: str
    reference: str | None = None


@dataclass
class Splits:
    """Disjoint train / validation / test prompts (no prompt text appears in two splits)."""

    train: list[Record]
    validation: list[Record]
    test: list[Record]

    def __getitem__(self, name: str) -> list[Record]:
        """``splits["test"]``: select a split by the name used in configs (``eval.split``)."""
        if name not in SPLIT_NAMES:
            raise EmorlError(f"unknown split {name!r}; use one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {n: len(getattr(self, n)) for n in SPLIT_NAMES}


# --------------------------------------------------------------------------------------------- public API

def load_records(cfg: DataConfig) -> list[Record]:
    """All records of the configured source, in file order (PAIR: one per unique prompt)."""
    if cfg.source == "default":
        return default_records()
    if not cfg.path:
        raise EmorlError(f"data.path is required for data.source={cfg.source!r}")
    if cfg.source == "hf":
        return load_hf(cfg.path, cfg.prompt_field, cfg.reference_field, cfg.hf_split)
    path = _existing_file(cfg.path, cfg.source)
    if cfg.source == "pair":
        return load_pair_csv(path, seed=cfg.seed)
    if cfg.source == "psych8k":
        return load_json_records(path, "input", "output")
    if cfg.source == "csv":
        return load_csv_records(path, cfg.prompt_field, cfg.reference_field)
    if cfg.source == "jsonl":
        return load_json_records(path, cfg.prompt_field, cfg.reference_field)
    raise EmorlError(f"data.source: unknown source {cfg.source!r}; use default, pair, psych8k, csv, jsonl or hf")


def load_splits(cfg: DataConfig) -> Splits:
    """Load the records, drop repeated prompts, shuffle (``cfg.shuffle``, ``cfg.seed``), keep at most
    ``cfg.max_prompts``, and cut train / validation / test by ``cfg.split``."""
    return split_records(load_records(cfg), cfg.split, shuffle=cfg.shuffle, seed=cfg.seed,
                         max_prompts=cfg.max_prompts)


def split_records(records: list[Record], split: list[float], shuffle: bool = True, seed: int = 0,
                  max_prompts: int | None = None) -> Splits:
    """Deterministic split. Repeated prompts are dropped first (first occurrence kept) so a prompt can never
    be trained on and tested on; cut points are ``floor(n * cumulative fraction)``."""
    if len(split) != 3 or any(not math.isfinite(s) or s < 0 for s in split) or abs(sum(split) - 1) > 1e-6:
        raise EmorlError(f"data.split must be three non-negative fractions summing to 1, got {split}")
    if max_prompts is not None and max_prompts < 1:
        raise EmorlError(f"data.max_prompts must be >= 1 (or null for all), got {max_prompts}")
    unique, seen = [], set()
    for r in records:
        if r.prompt not in seen:
            seen.add(r.prompt)
            unique.append(r)
    if len(unique) < len(records):
        log.info("data: dropped %d repeated prompts", len(records) - len(unique))
    if not unique:
        raise EmorlError("the data source holds no prompts; check data.source and data.path")
    if shuffle:
        random.Random(seed).shuffle(unique)
    if max_prompts is not None:
        unique = unique[:max_prompts]
    n = len(unique)
    a = math.floor(n * split[0] + 1e-9)
    b = max(a, math.floor(n * (split[0] + split[1]) + 1e-9))
    out = Splits(unique[:a], unique[a:b], unique[b:])
    for name, frac in zip(SPLIT_NAMES, split, strict=True):
        if frac > 0 and not out[name]:
            raise EmorlError(f"data.split {list(split)} leaves the {name} split empty with {n} prompts; use more "
                             f"prompts (data.max_prompts) or a larger {name} fraction")
    log.info("data: %d prompts -> train %d / validation %d / test %d", n, *out.sizes().values())
    return out


# --------------------------------------------------------------------------------------------- built-in task

def default_records() -> list[Record]:
    """The built-in emotional-support task: the statements written for emorl (with reference replies), then
    emotional first-person turns from chitchat-dataset (no reference), without repeats. About 1 s."""
    return list(_default_records())


@functools.cache
def _default_records() -> tuple[Record, ...]:
    own = handwritten_records()
    keys = {_dedup_key(r.prompt) for r in own}
    extra = [r for r in chitchat_records() if _dedup_key(r.prompt) not in keys]
    log.debug("default data: %d written for emorl + %d from chitchat-dataset", len(own), len(extra))
    return tuple(own + extra)


def handwritten_records() -> list[Record]:
    """Client statements written for emorl (``assets/support_prompts.jsonl``, Apache-2.0 like the code)."""
    return load_json_records(SUPPORT_PROMPTS, "prompt", "reference")


# The chitchat-dataset filter. Casual chat between students, so most turns are not about feelings; a turn is
# kept when one of its messages says in the first person how the writer feels (or reports a loss), and it is
# not laughter, media talk, a hypothetical, a question, or addressed to the chat partner. See docs/data.md.
_EMOTIONS = ("stressed|stressed out|anxious|depressed|lonely|sad|upset|worried|scared|afraid|terrified|overwhelmed|"
             "heartbroken|exhausted|miserable|hurt|frustrated|nervous|hopeless|homesick|devastated|discouraged|"
             "insecure|burned out|burnt out|struggling|freaking out|panicking|ashamed|guilty|disappointed|drained|"
             "worn out|grieving|so alone|all alone")
_FEELINGS = "terrible|awful|lost|stuck|behind|alone|useless|worthless|empty"  # emotional only after "I feel"
_MODIFIERS = (r"(?:so |really |very |kind of |kinda |a little |a bit |pretty |super |just |always |still |feeling "
              r"|getting |been |honestly |totally |extremely |quite |more and more |too |starting to feel "
              r"|starting to get )*")
_FIRST_PERSON_EMOTION = re.compile(
    r"\bi(?:'m| am|m| have been|'ve been| get| feel| keep feeling)\s+" + _MODIFIERS + f"(?:{_EMOTIONS})"
    r"\b(?! at\b| with\b| to (?:say|ask)\b| eater| i\b| that i\b)"  # "terrible at", "I'm afraid I don't know"
    r"|\bi(?: feel|'m feeling| am feeling| have been feeling|'ve been feeling)\s+" + _MODIFIERS + f"(?:{_FEELINGS})"
    r"\b(?! at\b| with\b)")
_LOSS = re.compile(
    r"\bmy (?:\w+ )?(?:mom|dad|mother|father|grandma|grandpa|grandmother|grandfather|brother|sister|friend|dog|cat"
    r"|uncle|aunt|cousin|husband|wife|boyfriend|girlfriend) (?:just )?(?:passed away|died|broke up with me|is sick"
    r"|has cancer|got sick)")
_EXCLUDE = re.compile(
    r"\b(?:ha(?:ha)+\w*|hah\w*|lol|lmao|jk|xd|movies?|film|show|season|episode|netflix|marvel|avengers|batman|loki"
    r"|games?|book|song|fun|glad|excited|awesome|cute|love|thank goodness|not worried|never|would|if|you|your"
    r"|sorry|relief|great|amazing|interesting|cool|nice|good to know|computers?|siri|android|apple|icloud|instagram"
    r"|nasa|politics|competition|points|first place|win|spiders?|chimps?|potato\w*|crabs?|dream|when i'?m"
    r"|when i am)\b|[#@<>;:*()]|!!|[,\-]$", re.IGNORECASE)
# a message that stops mid-thought (the writer went on in the next message): "... as we continue to"
_UNFINISHED = re.compile(r"\b(?:the|a|an|to|that|there|as|in|be|with|and|but|or|of|for|will|not|super|next|"
                         r"two|\w)$", re.IGNORECASE)
_LEADING_FILLER = re.compile(r"^(?:(?:yeah|yea|ya|yes|yep|oh|ah+|um+|hmm+|well|same|same here|true|ok|okay|right"
                             r"|lol|wow|i know|and|but|so)\b[\s,.!]*)+", re.IGNORECASE)


def chitchat_records(conversations: Mapping[str, Any] | None = None) -> list[Record]:
    """Emotional first-person turns of chitchat-dataset (MIT, BYU PCC Lab), by a fixed deterministic filter.

    ``conversations`` defaults to the package's ``dataset.json`` ({id: {"messages": [[{"text": ...}, ...], ...]}}).
    Messages are scanned in file order. A message qualifies when it matches ``_FIRST_PERSON_EMOTION`` or
    ``_LOSS``; a short one (< 8 words) takes the next message of the same turn along. Leading fillers
    ("yeah", "oh", ...) are cut, then the text must be 40-240 characters, not a question, and free of
    ``_EXCLUDE``; repeats (same letters) are dropped.
    """
    if conversations is None:
        try:
            path = importlib.resources.files("chitchat_dataset") / "dataset.json"
            conversations = json.loads(path.read_bytes())
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise EmorlError("the built-in data set needs the 'chitchat-dataset' package (pip install "
                             f"chitchat-dataset), or set data.source to a file of your own ({e})") from None
    out: list[Record] = []
    seen: set[str] = set()
    for conv in conversations.values():
        for turn in conv["messages"]:
            texts = [m["text"] for m in turn]
            for i, text in enumerate(texts):
                low = text.lower()  # lower-case once, then case-sensitive patterns: ~2x faster than re.I
                if not (_FIRST_PERSON_EMOTION.search(low) or ("my " in low and _LOSS.search(low))):
                    continue
                text = " ".join(text.split())
                if len(text.split()) < 8 and i + 1 < len(texts):
                    text += (" " if text[-1:] in ".!" else ". ") + " ".join(texts[i + 1].split())
                text = _LEADING_FILLER.sub("", text).strip()
                if not 40 <= len(text) <= 240 or text.endswith("?") or _EXCLUDE.search(text) \
                        or _UNFINISHED.search(text):
                    continue
                key = _dedup_key(text)
                if key not in seen:
                    seen.add(key)
                    out.append(Record(text[0].upper() + text[1:]))
    return out


def _dedup_key(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


# --------------------------------------------------------------------------------------------- file loaders

def _existing_file(path: str | Path, source: str) -> Path:
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
