"""Folders as data: pack files into ``{relative path: bytes}`` and write them back atomically.

Remote workers never write into the run folder: they return (or receive) packed files, and the driver writes
them. So a cluster needs no shared filesystem, and a worker killed mid-write cannot leave a half-written file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from emorl.utils import atomic_folder

Files = dict[str, bytes]


def pack(root: Path, paths: Iterable[str | Path]) -> Files:
    """Every file under each of ``paths`` (files or folders, relative to ``root``); missing paths are skipped."""
    root = Path(root)
    out: Files = {}
    for rel in paths:
        p = root / rel
        if p.is_file():
            out[p.relative_to(root).as_posix()] = p.read_bytes()
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts):
                    out[f.relative_to(root).as_posix()] = f.read_bytes()
    return out


def _safe(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise ValueError(f"packed path {rel!r} escapes {root}")
    return p


def unpack(files: Files, root: Path) -> None:
    """Write packed files under ``root`` (plain writes: for a worker's own scratch folder)."""
    for rel, data in files.items():
        p = _safe(Path(root), rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def replace_folder(files: Files, root: Path, folder: str) -> None:
    """Make ``root/folder`` hold exactly the packed files under ``folder``: written to a temp sibling, then renamed
    into place, so a reader (or a killed driver) sees the old folder or the new one, never a mix."""
    prefix = folder.rstrip("/") + "/"
    with atomic_folder(_safe(Path(root), folder)) as tmp:
        unpack({rel[len(prefix):]: data for rel, data in files.items() if rel.startswith(prefix)}, tmp)
