"""``emorl serve``: an OpenAI-compatible HTTP API and a web page that steer the objectives' trade-off per request.

>>> from emorl.serve import Engine, create_app
>>> app = create_app(Engine("runs/default"))      # uvicorn.run(app, host="127.0.0.1", port=8000)

Needs the ``serve`` extra (``pip install 'emorl[serve]'``: FastAPI + uvicorn). See docs/serve.md.
"""

from emorl.serve.engine import Engine, Job, Method
from emorl.serve.protocol import ApiError

__all__ = ["ApiError", "Engine", "Job", "Method", "create_app"]


def create_app(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - imported lazily: FastAPI is an optional extra
    from emorl.serve.app import create_app as make

    return make(*args, **kwargs)
