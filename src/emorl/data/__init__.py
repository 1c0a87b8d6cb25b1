"""Prompt data: records, the built-in emotional-support task, file loaders, deterministic splits, and the
formatting of a client statement into the model's input text.

Loaders raise :class:`~emorl.utils.EmorlError` naming the file and line of a malformed row before any
training starts. Sources (``DataConfig.source``):

- ``default``: :func:`default_records` — statements written for emorl plus emotional turns from chitchat-dataset.
- ``pair``: the PAIR CSV (9 columns; one record per unique prompt, reference = one seeded-random hq reflection).
- ``psych8k``: Psych8k JSON (``input`` -> prompt, ``output`` -> reference).
- ``csv`` / ``jsonl``: any file with ``prompt_field`` (and optionally ``reference_field``) columns or keys.
- ``hf``: a Hugging Face dataset saved with ``save_to_disk`` (a folder), or a hub name (needs a network).

Modules: :mod:`~emorl.data.records` (Record, Splits, split_records), :mod:`~emorl.data.files` (the file
loaders), :mod:`~emorl.data.builtin` (the default task); ``load_records`` / ``load_splits`` pick by source here.
Formatting and tokenising a statement for the model (``format_prompts``, ``encode_prompts``) lives in
:mod:`emorl.prompts` and is re-exported here.
"""

from __future__ import annotations

from emorl.config import DataConfig
from emorl.data.builtin import SUPPORT_PROMPTS, chitchat_records, default_records, handwritten_records
from emorl.data.files import (
    PAIR_COLUMNS,
    existing_file,
    load_csv_records,
    load_hf,
    load_json_records,
    load_pair_csv,
)
from emorl.data.records import SPLIT_NAMES, Record, Splits, split_records
from emorl.prompts import PromptText, encode_prompts, fit_prompts, format_prompts
from emorl.utils import EmorlError

__all__ = [
    "PAIR_COLUMNS", "SPLIT_NAMES", "SUPPORT_PROMPTS", "PromptText", "Record", "Splits", "chitchat_records",
    "default_records", "encode_prompts", "fit_prompts", "format_prompts", "handwritten_records", "load_csv_records",
    "load_hf", "load_json_records", "load_pair_csv", "load_records", "load_splits", "split_records",
]


def load_records(cfg: DataConfig) -> list[Record]:
    """All records of the configured source, in file order (PAIR: one per unique prompt)."""
    if cfg.source == "default":
        return default_records()
    if not cfg.path:
        raise EmorlError(f"data.path is required for data.source={cfg.source!r}")
    if cfg.source == "hf":
        return load_hf(cfg.path, cfg.prompt_field, cfg.reference_field, cfg.hf_split)
    path = existing_file(cfg.path, cfg.source)
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

