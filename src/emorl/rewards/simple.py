"""Rewards without a neural model of their own: ``python`` (your function), ``length`` and ``nontoxic``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emorl.rewards.base import Options, RewardError, empty, positive, register_reward
from emorl.rewards.text import words

if TYPE_CHECKING:
    from emorl.models import Base


def import_function(ref: str, where: str) -> Callable[..., Any]:
    """``'pkg.module:fn'`` or ``'path/to/file.py:fn'`` -> the function, with errors that say what to fix."""
    mod_name, sep, attr = ref.rpartition(":")
    if not sep or not mod_name or not attr:
        raise RewardError(f"{where}: {ref!r} is not of the form 'package.module:function' (or 'file.py:function')")
    if mod_name.endswith(".py"):
        path = Path(mod_name).expanduser()
        if not path.is_file():
            raise RewardError(f"{where}: file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"emorl_user_reward_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise RewardError(f"{where}: cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"{where}: importing {path} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise RewardError(f"{where}: cannot import module {mod_name!r} ({e}); is it installed or on PYTHONPATH? "
                              f"(a file can be given as 'path/to/file.py:function')") from e
        except Exception as e:
            raise RewardError(f"{where}: importing {mod_name!r} raised {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardError(f"{where}: module {mod_name!r} has no attribute {attr!r}; callables there: "
                          f"{', '.join(public[:20]) or 'none'}")
    if not callable(fn):
        raise RewardError(f"{where}: {ref!r} is a {type(fn).__name__}, not a function")
    return fn


@register_reward("python")
class PythonFunction:
    """Your function as a reward: ``fn(prompts, responses) -> floats in [0, 1]``, or a TRL reward function
    ``fn(prompts, completions, **kw) -> list[float]`` (recognised by its ``completions`` parameter and called
    with keywords, plain-text format). ``kwargs`` from the spec are passed through."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        self.name = name
        ref = opts.get("function", kind=str)
        self.kwargs = dict(opts.get("kwargs", {}, dict))
        self.fn = import_function(ref, f"objectives.{name}.function")
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            params = {}
        self.trl_style = "completions" in params

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        if self.trl_style:
            out = self.fn(prompts=list(prompts), completions=list(responses), **self.kwargs)
        else:
            out = self.fn(list(prompts), list(responses), **self.kwargs)
        if isinstance(out, list | tuple):
            out = [np.nan if v is None else v for v in out]  # TRL functions return None for "not applicable"
        return np.asarray(out, dtype=np.float64)


@register_reward("length")
class Length:
    """Closeness of the reply's word count n to ``target``: ``1 / (1 + ((n - target) / tolerance)**2)``, so 1 on
    target, 0.5 at ``tolerance`` words away, and a long smooth tail (never a flat zero)."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        self.name = name
        self.target = opts.get("target", 20.0, float, check=lambda x: x >= 0, expect="a word count >= 0")
        self.tolerance = opts.get("tolerance", 10.0, float, check=positive, expect="a number of words > 0")

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        n = np.array([len(words(r)) for r in responses], dtype=np.float64)
        scores = 1.0 / (1.0 + ((n - self.target) / self.tolerance) ** 2)
        scores[empty(list(responses))] = 0.0
        return scores


@register_reward("nontoxic")
class NonToxic:
    """1 - the offensive-language probability of the reply from ``alt-profanity-check`` (a small bundled
    linear model on character/word n-grams; fast, offline, English)."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        self.name = name
        self.predict: Callable[[list[str]], Any] | None = None

    def load(self) -> None:
        if self.predict is None:
            try:
                from profanity_check import predict_prob
            except ImportError as e:
                raise RewardError(f"objectives.{self.name}: reward type 'nontoxic' needs the package "
                                  f"alt-profanity-check (`pip install alt-profanity-check`)") from e
            self.predict = predict_prob

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        self.load()
        assert self.predict is not None
        scores = 1.0 - np.asarray(self.predict(list(responses)), dtype=np.float64)
        scores[empty(list(responses))] = 0.0
        return np.clip(scores, 0.0, 1.0)
