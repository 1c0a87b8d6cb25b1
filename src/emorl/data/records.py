"""Prompt records and the deterministic train / validation / test split every stage reads the same way."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

from emorl.utils import EmorlError

log = logging.getLogger(__name__)

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

