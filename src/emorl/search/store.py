"""The search log: ``RUN/search/<mode>/points.jsonl`` (one header line, then one line per scored point) and
``best.json``.

The header records what makes scores comparable — the adapters' content hashes, the objectives, the
validation prompts, the decoding settings — and a resume against anything else is refused, because mixing
scores of different adapters or prompts would silently corrupt the search. Lines are appended and fsynced
batch by batch (a killed search loses at most the batch in flight; a torn last line is dropped on read).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from emorl.search.evaluator import Key, PointRecord
from emorl.utils import EmorlError, _json_default, atomic_write_json, read_jsonl

LOG_VERSION = 1


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_identity(folder: str | Path) -> str:
    """A content hash of a saved adapter (weights + peft config): two folders get the same identity only
    if they hold the same adapter, whatever their path."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        p = folder / name
        if not p.exists():
            raise EmorlError(f"{folder} is not a peft adapter folder: {name} is missing")
        h.update(name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


class PointStore:
    """Append-only log of scored points with a header that guards resumes.

    ``PointStore(folder, header, resume=False)`` starts a new log and refuses to overwrite an existing one
    unless ``overwrite=True``; ``resume=True`` loads the existing log (if any) after checking its header.
    """

    def __init__(self, folder: str | Path, header: dict[str, Any], *, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "points.jsonl"
        self.header = {"kind": "header", "version": LOG_VERSION, **header}
        self._records: dict[Key, PointRecord] = {}
        if self.path.exists() and resume:
            self._load()
        elif self.path.exists() and not overwrite:
            raise EmorlError(f"{self.path} already exists. Pass --resume to continue that search (no point is "
                             f"re-evaluated), or --fresh to start over")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.header, default=_json_default) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)

    def _load(self) -> None:
        rows = read_jsonl(self.path)
        if not rows or rows[0].get("kind") != "header":
            raise EmorlError(f"{self.path}: the first line is not a search-log header; this file was not written "
                             f"by `emorl search`. Move it away or pass --fresh")
        old = rows[0]
        diffs = [k for k in sorted(set(old) | set(self.header)) if k not in ("kind", "created")
                 and _norm(old.get(k)) != _norm(self.header.get(k))]
        if "adapters" in diffs:
            raise EmorlError(
                f"{self.path} was written with other adapters ({_show(old.get('adapters'))}) than the ones loaded "
                f"now ({_show(self.header.get('adapters'))}); its scores do not apply. Search into another run "
                f"folder, or pass --fresh to discard that log")
        if diffs:
            detail = "; ".join(f"{k}: log has {_show(old.get(k))}, now {_show(self.header.get(k))}" for k in diffs)
            raise EmorlError(f"{self.path} was written with different settings ({detail}); its scores are not "
                             f"comparable. Restore those settings to resume, or pass --fresh")
        for i, row in enumerate(rows[1:], start=2):
            try:
                rec = PointRecord.from_json(row)
            except (KeyError, TypeError, ValueError) as e:
                raise EmorlError(f"{self.path}:{i}: not a point record ({e}); fix or delete that line") from e
            if len(rec.weights) != len(self.header.get("names") or rec.weights):
                raise EmorlError(f"{self.path}:{i}: {len(rec.weights)} weights, expected {len(self.header['names'])}")
            self._records[rec.weights] = rec

    def records(self) -> list[PointRecord]:
        return list(self._records.values())

    def append(self, rec: PointRecord) -> None:
        self.extend([rec])

    def extend(self, recs: list[PointRecord]) -> None:
        """Append a batch with one write and one fsync."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r.to_json(), default=_json_default) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())
        for r in recs:
            self._records[r.weights] = r

    def write_best(self, payload: dict[str, Any]) -> Path:
        path = self.folder / "best.json"
        atomic_write_json(path, payload)
        return path


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=_json_default))


def _show(v: Any) -> str:
    text = json.dumps(v, default=_json_default)
    return text if len(text) < 160 else text[:157] + "..."
