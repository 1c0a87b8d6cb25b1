"""``emorl serve``: an OpenAI-compatible HTTP API and a web page that steer the objectives' trade-off per request.

>>> from emorl.serve import Engine, create_app
>>> app = create_app(Engine("runs/default"))      # uvicorn.run(app, host="127.0.0.1", port=8000)

Needs the ``serve`` extra (``pip install 'emorl[serve]'``: FastAPI + uvicorn). See docs/serve.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ApiError", "Engine", "Job", "ServedModel", "create_app"]

# imported on first use, so `emorl serve --help` (emorl.serve.cli) does not wait for torch
_LAZY = {"Engine": "emorl.serve.engine", "Job": "emorl.serve.engine", "ServedModel": "emorl.serve.engine",
         "ApiError": "emorl.serve.protocol"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emorl.serve' has no attribute {name!r}")


def create_app(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - imported lazily: FastAPI is an optional extra
    from emorl.serve.app import create_app as make

    return make(*args, **kwargs)
