"""Configs from presets and YAML files (a preset may inherit another with ``base:``), overrides on top, and a run
folder's own config."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from emorl.config.coerce import _from_dict, _set_path, parse_override
from emorl.config.schema import RunConfig
from emorl.config.validate import validate
from emorl.utils import EmorlError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if k in out and isinstance(out[k], dict) and isinstance(v, dict) and k != "objectives":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise EmorlError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise EmorlError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise EmorlError(f"{path}: the top level must be a mapping of sections (model, lora, data, ...)")
    return data


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from defaults, a preset name or YAML file (``source``), then ``key=value`` overrides.

    A preset may name another with ``base: <preset>`` to inherit from it.
    """
    data: dict[str, Any] = {}
    if source is not None:
        data = _load_layered(source)
    for ov in overrides or []:
        path, value = parse_override(ov)
        _set_path(data, path, value)
    try:
        cfg = _from_dict(RunConfig, data)
    except EmorlError as e:
        src = f" (from {source})" if source else ""
        raise EmorlError(f"{e}{src}") from None
    validate(cfg)
    return cfg


def _load_layered(source: str | Path, depth: int = 0) -> dict[str, Any]:
    if depth > 5:
        raise EmorlError(f"config {source}: 'base:' chain is too deep (a loop?)")
    p = Path(source)
    if not p.suffix and not p.exists():
        p = PRESET_DIR / f"{source}.yaml"
        if not p.exists():
            raise EmorlError(f"unknown preset {source!r}; presets: {', '.join(preset_names())}, or pass a YAML file")
    data = read_yaml(p)
    base = data.pop("base", None)
    if base:
        data = _deep_merge(_load_layered(base, depth + 1), data)
    return data


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config a run folder was made with (``RUN/config.yaml``), with dotted ``overrides`` on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise EmorlError(f"{path} does not exist: --run must be a run folder made by `emorl train` (it holds "
                         f"config.yaml and adapters/<objective>/)")
    return load_config(str(path), overrides)


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for `emorl config --help-keys` and the docs."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
