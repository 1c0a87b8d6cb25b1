"""The page of ``emorl judge``: a FastAPI app that shows one blind item at a time and records each answer.

Routes: ``GET /`` (the page, files in ``static/``, no CDN), ``GET /api/session`` (criteria and progress),
``GET /api/next`` (the next unanswered item: prompt and two replies, never the methods), ``POST /api/answer``
(``{"item", "choices": {criterion: left|tie|right}}``). Answers are appended to ``RUN/judge/answers.jsonl``
before the reply is sent, so a restart continues where the rater stopped.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from emorl.judge.store import DESCRIPTIONS, AnswerStore, Item
from emorl.utils import EmorlError

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024


@dataclass
class Session:
    """What one rater judges: the planned items in order, the criteria, and where answers go."""

    items: list[Item]
    criteria: list[str]
    rater: str
    store: AnswerStore
    _by_id: dict[str, Item] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._by_id = {it.id: it for it in self.items}

    def info(self) -> dict[str, Any]:
        done = self.done()
        return {"criteria": [{"name": c, "question": DESCRIPTIONS.get(c, f"Which reply is better for {c}?")}
                             for c in self.criteria],
                "total": len(self.items), "answered": len(done), "rater": self.rater}

    def done(self) -> set[str]:
        return self.store.answered(self.rater) & set(self._by_id)

    def next(self) -> dict[str, Any]:
        done = self.done()
        left = [it for it in self.items if it.id not in done]
        progress = {"total": len(self.items), "answered": len(done)}
        return {**progress, "item": left[0].public() if left else None}

    def answer(self, item_id: Any, choices: Any) -> dict[str, Any]:
        item = self._by_id.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise EmorlError(f"item: {item_id!r} is not an item of this session; reload the page")
        with self._lock:
            added = self.store.add(item, self.rater, choices, self.criteria)
        return {"saved": added, **self.next()}


def create_app(session: Session) -> Any:
    """The app over one session; every error is ``{"error": message}`` with a 4xx status."""
    app = FastAPI(title="emorl judge", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(EmorlError)
    async def _bad(request: Request, e: EmorlError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/session")
    def info() -> dict[str, Any]:
        return session.info()

    @app.get("/api/next")
    def next_item() -> dict[str, Any]:
        return session.next()

    @app.post("/api/answer")
    async def answer(request: Request) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": f"the request body is over {MAX_BODY} bytes"}, status_code=413)
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return JSONResponse({"error": f"the request body is not JSON ({e})"}, status_code=400)
        if not isinstance(data, dict):
            return JSONResponse({"error": "send a JSON object {\"item\": ..., \"choices\": {...}}"}, status_code=400)
        return session.answer(data.get("item"), data.get("choices"))

    return app
