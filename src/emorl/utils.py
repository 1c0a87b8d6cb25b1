"""Small shared helpers: atomic file writes, seeding, device choice, errors.

Every file emorl writes goes through :func:`atomic_write_bytes` (temp file in the same folder, fsync, rename),
so a run killed at any instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `emorl --help` must not wait for torch
    import torch


class EmorlError(Exception):
    """An error caused by the user's input (config, data, adapters, weights). The CLI prints it without a
    traceback, so its message must say what is wrong, where, and how to fix it."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Fill the yielded temp sibling of ``folder``; on success it replaces ``folder`` (two renames, so a reader or
    a killed process sees the old folder or the new one, never a mix); on failure it is removed."""
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield tmp
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line and fsync: a killed process loses at most the line being written, and readers
    (:func:`read_jsonl`) skip a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # torn last line from a killed writer: drop it
                break
            raise EmorlError(f"{path}:{i + 1}: not valid JSON ({e}); fix or delete that line") from e
    return out


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_dir() -> Path:
    """Where converted models live: ``$EMORL_CACHE`` or ``~/.cache/emorl``."""
    return Path(os.environ.get("EMORL_CACHE", Path.home() / ".cache" / "emorl")).expanduser()


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, for checkpoints (torch state as a uint8 tensor)."""
    import numpy as np
    import torch

    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


_CONSOLE = None
_LOG_FILES: set[Path] = set()


def attach_log_file(path: str | Path) -> Path:
    """Send every emorl log record, debug level included, to ``path`` (once per path). Third-party warnings and
    notices that the CLI keeps off the console (see emorl.cli) land here too, under ``emorl.thirdparty``."""
    import logging

    path = Path(path).resolve()
    if path not in _LOG_FILES:
        path.parent.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(path)
        h.setLevel(logging.DEBUG)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("emorl").addHandler(h)
        _LOG_FILES.add(path)
    return path


def console() -> Any:
    """The shared rich console (stderr), so progress bars and log lines don't interleave badly."""
    global _CONSOLE
    if _CONSOLE is None:
        import sys

        from rich.console import Console

        # off a terminal rich would wrap at 80 columns: plans and tables in a CI log stay one line per row
        wide = not sys.stderr.isatty() and "COLUMNS" not in os.environ
        _CONSOLE = Console(stderr=True, width=120 if wide else None)
    return _CONSOLE


# ------------------------------------------------------------------------------------------- reading files back

def read_json_checked(path: str | Path, what: str, fix: str) -> Any:
    """Parse a JSON file emorl (or a library) wrote; a missing, unreadable or cut-short file raises an
    :class:`EmorlError` naming ``what`` and ``path`` and saying ``fix`` (e.g. "re-train it", "restore it")."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmorlError(f"{what} {path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmorlError(f"{what} {path} is corrupt ({e}); {fix}") from e


def check_safetensors(path: str | Path, what: str, fix: str) -> None:
    """Check a safetensors file is whole without loading it (no torch): its 8-byte header length, its JSON
    header, and a size equal to header + the last tensor's end offset. A file cut short (a full disk, an
    interrupted copy) raises an :class:`EmorlError` naming ``what``, ``path`` and ``fix``."""
    import struct

    path = Path(path)

    def bad(reason: str) -> EmorlError:
        return EmorlError(f"{what} {path} is corrupt ({reason}); {fix}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise bad(f"header of {n} bytes in a file of {size}: cut short")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise EmorlError(f"{what} {path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"unreadable header: {e}") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise bad(f"malformed header: {e}") from e
    if size != 8 + n + end:
        raise bad(f"{size} bytes where the header describes {8 + n + end}: cut short or padded")


def load_safetensors_checked(path: str | Path, what: str, fix: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """:func:`check_safetensors`, then load every tensor (any loader error becomes the same clear error)."""
    from safetensors.torch import load_file

    check_safetensors(path, what, fix)
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own (Rust) error types
        raise EmorlError(f"{what} {path} is corrupt ({e}); {fix}") from e
