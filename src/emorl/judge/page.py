"""The offline form of the judge page: one self-contained HTML file (style, script and items inlined; no server,
no network) that keeps answers in the browser and downloads them as JSONL for ``emorl judge --import``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emorl.judge.store import DESCRIPTIONS, Item
from emorl.utils import atomic_write_text

STATIC = Path(__file__).parent / "static"
CSS_TAG = '<link rel="stylesheet" href="/static/judge.css">'
JS_TAG = '<script src="/static/judge.js"></script>'


def page_data(items: list[Item], criteria: list[str], rater: str, plan_salt: str) -> dict[str, Any]:
    """What the offline page holds: the items' public side only (ids, prompts, replies), never the methods."""
    import hashlib

    ids = "".join(it.id for it in items)
    return {"plan": hashlib.sha256((plan_salt + ids).encode()).hexdigest()[:12], "rater": rater,
            "criteria": [{"name": c, "question": DESCRIPTIONS.get(c, f"Which reply is better for {c}?")}
                         for c in criteria],
            "items": [it.public() for it in items]}


def _inline_json(obj: Any) -> str:
    """JSON safe inside a <script> element ("</script>" in a reply cannot close it)."""
    return json.dumps(obj, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def render_html(data: dict[str, Any]) -> str:
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    css = (STATIC / "judge.css").read_text(encoding="utf-8")
    js = (STATIC / "judge.js").read_text(encoding="utf-8")
    if CSS_TAG not in html or JS_TAG not in html or "</" in js or "</" in css:  # a packaging bug, not the user's
        raise RuntimeError("judge/static/: index.html lost its tags, or judge.js/judge.css holds '</'")
    return (html.replace(CSS_TAG, f"<style>\n{css}</style>")
                .replace(JS_TAG, f"<script>window.JUDGE_DATA = {_inline_json(data)};</script>\n"
                                 f"<script>\n{js}</script>"))


def write_html(path: str | Path, items: list[Item], criteria: list[str], rater: str, plan_salt: str) -> Path:
    path = Path(path)
    atomic_write_text(path, render_html(page_data(items, criteria, rater, plan_salt)))
    return path
