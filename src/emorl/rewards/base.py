"""The reward contract, the registry of reward types, strict option parsing and the validating :func:`score`.

A reward is any object with a ``name`` and ``__call__(prompts, responses) -> np.ndarray`` of floats in [0, 1]
(``prompts`` are the raw client statements, ``responses`` the decoded replies). Config specs
(``{"type": ..., **options}``) are turned into rewards by factories registered with :func:`register_reward`.
Every option a factory reads goes through :class:`Options`, so a misspelt or unknown option is an error naming
``objectives.<name>.<option>`` and the valid choices *before* any model is loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from emorl.utils import EmorlError

if TYPE_CHECKING:
    from emorl.models import Base


class RewardError(EmorlError):
    """A reward spec is invalid, or a reward failed or returned an invalid value while scoring."""


@runtime_checkable
class Reward(Protocol):
    """Scores a batch of (client statement, reply) pairs; higher is better, every value in [0, 1]."""

    name: str

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray: ...


RewardFactory = Callable[[str, "Options", "Base | None"], Reward]
REGISTRY: dict[str, RewardFactory] = {}


def register_reward(type_name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make ``{"type": type_name, ...}`` build a reward with ``factory(name, options, base)``.

    ``options`` is an :class:`Options`; read every option through it (``options.get("threshold", 0.5,
    float)``) so unknown or misspelt keys are reported. If the returned object has a ``load()`` method,
    :func:`build_rewards` calls it after every spec has been validated (load models there, not in ``__init__``).
    """
    if not type_name or not isinstance(type_name, str):
        raise ValueError("register_reward needs a non-empty type name")

    def deco(factory: RewardFactory) -> RewardFactory:
        REGISTRY[type_name] = factory
        return factory

    return deco


_MISSING = object()


class Options:
    """The options of one reward spec, read with type checks; remembers which keys were read so leftovers
    (typos) can be reported with the list of valid ones."""

    def __init__(self, name: str, spec: dict[str, Any], section: str = "objectives"):
        self.name = name
        self.type = spec.get("type")
        self.where = f"{section}.{name}"
        self._spec = {k: v for k, v in spec.items() if k != "type"}
        self._known: list[str] = []

    def error(self, key: str, msg: str) -> RewardError:
        return RewardError(f"{self.where}.{key}: {msg}")

    def get(self, key: str, default: Any = _MISSING, kind: type | tuple[type, ...] | None = None,
            choices: Sequence[Any] | None = None, check: Callable[[Any], bool] | None = None,
            expect: str = "") -> Any:
        """The value of option ``key`` (or ``default``; no default = required), checked against ``kind``,
        ``choices`` and ``check`` (``expect`` describes what ``check`` wants, for the message)."""
        self._known.append(key)
        if key not in self._spec:
            if default is _MISSING:
                raise self.error(key, f"required by reward type {self.type!r} (add `{key}: ...` to its spec)")
            return default
        value = self._spec[key]
        if value is None and default is None:
            return None
        if kind is not None:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                names = " or ".join(k.__name__ for k in kinds)
                raise self.error(key, f"expected {names}, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(map(repr, choices))}")
        if check is not None and not check(value):
            raise self.error(key, f"expected {expect or 'a valid value'}, got {value!r}")
        return value

    def finish(self) -> None:
        """Raise on any option the factory never read."""
        unknown = [k for k in self._spec if k not in self._known]
        if unknown:
            valid = ", ".join(["type", *dict.fromkeys(self._known)])
            raise self.error(unknown[0], f"unknown option for reward type {self.type!r}; valid options: {valid}")


def _make(name: str, spec: dict[str, Any], base: Base | None, section: str = "objectives") -> Reward:
    where = f"{section}.{name}"
    if not isinstance(spec, dict):
        raise RewardError(f"{where}: a reward spec must be a mapping like {{type: empathy}}, got {spec!r}")
    t = spec.get("type")
    if t is None:
        raise RewardError(f"{where}.type: missing; choose one of {', '.join(sorted(REGISTRY))}")
    if t not in REGISTRY:
        raise RewardError(f"{where}.type: unknown reward type {t!r}; choose one of {', '.join(sorted(REGISTRY))} "
                          f"(or register your own with emorl.rewards.register_reward)")
    opts = Options(name, spec, section)
    reward = REGISTRY[t](name, opts, base)
    opts.finish()
    if not callable(reward):
        raise RewardError(f"{where}: the factory of type {t!r} returned {type(reward).__name__}, which is not callable")
    if getattr(reward, "name", None) != name:
        try:
            reward.name = name
        except AttributeError as e:
            raise RewardError(f"{where}: the reward object of type {t!r} has no settable `name`") from e
    return reward


def _load(reward: Reward) -> None:
    load = getattr(reward, "load", None)
    if callable(load):
        load()


def build_reward(name: str, spec: dict[str, Any], base: Base | None = None) -> Reward:
    """Build (and load) the reward of objective ``name`` from its spec ``{"type": ..., **options}``."""
    reward = _make(name, spec, base)
    _load(reward)
    return reward


def build_rewards(objectives: dict[str, dict[str, Any]], base: Base | None = None, *,
                  section: str = "objectives") -> dict[str, Reward]:
    """Build every objective's reward. All specs are validated first, then models are loaded, so a typo in
    the last spec is reported before the first model loads. ``section`` names the config section in errors
    (``eval.judges`` for held-out judges)."""
    if not objectives:
        raise RewardError(f"{section}: at least one reward is needed")
    rewards = {name: _make(name, spec, base, section) for name, spec in objectives.items()}
    for r in rewards.values():
        _load(r)
    return rewards


# ------------------------------------------------------------------------------------------ validation

def _short(text: str, n: int = 80) -> str:
    text = str(text).replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def _sample(prompts: list[str], responses: list[str], i: int) -> str:
    return f"sample {i} of {len(prompts)} (prompt {_short(prompts[i])!r}, response {_short(responses[i])!r})"


def score(reward: Reward, prompts: list[str], responses: list[str]) -> np.ndarray:
    """Call ``reward`` and check its answer: an exception, the wrong shape, NaN/inf or a value outside [0, 1]
    becomes a :class:`RewardError` naming the reward and one offending sample. Returns float64, shape (n,)."""
    name = getattr(reward, "name", type(reward).__name__)
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise RewardError(f"reward {name!r}: got {len(prompts)} prompts but {len(responses)} responses")
    n = len(prompts)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    try:
        raw = reward(prompts, responses)
    except RewardError:
        raise
    except Exception as e:
        raise _locate_exception(reward, name, prompts, responses, e) from e
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name!r} returned {type(raw).__name__} that is not numeric ({e}); "
                          f"it must return {n} floats in [0, 1]") from e
    if values.shape != (n,):
        raise RewardError(f"reward {name!r} returned shape {values.shape} for {n} samples; it must return one "
                          f"float in [0, 1] per (prompt, response) pair")
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RewardError(f"reward {name!r} returned {values[i]} for {_sample(prompts, responses, i)}; rewards must "
                          f"be finite (return 0 for replies that cannot be scored)")
    tol = 1e-6
    bad = (values < -tol) | (values > 1 + tol)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RewardError(f"reward {name!r} returned {values[i]:.6g} for {_sample(prompts, responses, i)}; rewards "
                          f"must lie in [0, 1] (rescale it, e.g. with a sigmoid or min-max map)")
    return np.clip(values, 0.0, 1.0)


def _locate_exception(reward: Reward, name: str, prompts: list[str], responses: list[str],
                      exc: Exception) -> RewardError:
    """Re-run the samples one at a time to name the first one that raises (only on the error path)."""
    what = f"{type(exc).__name__}: {exc}"
    if len(prompts) > 1:
        for i in range(len(prompts)):
            try:
                reward([prompts[i]], [responses[i]])
            except Exception as e:  # noqa: BLE001 - any failure names the sample
                what = f"{type(e).__name__}: {e}"
                return RewardError(f"reward {name!r} raised {what} on {_sample(prompts, responses, i)}")
    if len(prompts) == 1:
        where = _sample(prompts, responses, 0)
    else:
        where = (f"a batch of {len(prompts)} samples (no single sample fails alone; first: prompt "
                 f"{_short(prompts[0])!r}, response {_short(responses[0])!r})")
    return RewardError(f"reward {name!r} raised {what} on {where}")


# ------------------------------------------------------------------------------------------ shared models

_CACHE: dict[tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.RLock()


def shared(key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
    """Load an object (a reward model) once per process: every reward that asks for the same ``key``
    (e.g. ``("encoder", path, device)``) gets the same instance."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load()
        return _CACHE[key]


def clear_cache() -> None:
    """Drop every shared reward model (frees memory; the next use reloads)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def pick_device(opts: Options, base: Base | None) -> str:
    """The ``device`` option: default = the base model's device if there is one, else CUDA if present."""
    import torch

    dev = opts.get("device", None, str)
    if dev is None:
        if base is not None:
            return str(base.device)
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(dev)
    except (RuntimeError, ValueError) as e:
        raise opts.error("device", f"{dev!r} is not a torch device (use 'cpu', 'cuda', 'cuda:1', ...)") from e
    return dev


def pick_dtype(opts: Options, base: Base | None, device: str) -> Any:
    """The ``dtype`` option of a reward model: default = the base model's dtype on CUDA (a bfloat16 run keeps its
    scorers in bfloat16 too: half the memory, tensor cores), float32 elsewhere (CPU scores stay as they were)."""
    import torch

    name = opts.get("dtype", None, str, choices=("float32", "bfloat16", "float16"))
    if name is not None:
        return getattr(torch, name)
    if base is not None and torch.device(device).type == "cuda":
        return next(base.model.parameters()).dtype
    return torch.float32


def load_kwargs(device: str, dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments that load a reward model straight onto its device in its dtype (no float32
    copy in host RAM first)."""
    import torch

    d = torch.device(device)
    if d.type == "cuda" and d.index is None:  # "cuda": the current device (the one Ray or the user set)
        d = torch.device("cuda", torch.cuda.current_device())
    return {"dtype": dtype, "device_map": {"": d}}


def placement(opts: Options, base: Base | None) -> tuple[str, Any]:
    """The ``device`` and ``dtype`` options of a reward model, read together (the dtype default follows the device)."""
    device = pick_device(opts, base)
    return device, pick_dtype(opts, base, device)


def load_pretrained(kind: str, auto: str, path: str, device: str, dtype: Any, where: str,
                    hint: str = "") -> tuple[Any, Any]:
    """A model of transformers class ``auto`` (``"AutoModelForCausalLM"``, ...) and its tokenizer, loaded once per
    process (key: ``kind``, path, device, dtype) onto ``device`` in ``dtype``, in eval mode and frozen. A model that
    will not load is an error naming ``{where}.model`` and the ``kind`` it wanted; ``hint`` ends the fix."""
    import transformers

    def load() -> tuple[Any, Any]:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path)
            model = getattr(transformers, auto).from_pretrained(path, **load_kwargs(device, dtype))
        except (OSError, ValueError) as e:
            raise RewardError(f"{where}.model: cannot load {kind} {path!r} ({e}). Give a local folder with config.json "
                              f"and a tokenizer, or a hub id (needs a network or a filled HF cache){hint}") from e
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, tok

    return shared((kind, path, device, str(dtype)), load)


def empty(responses: list[str]) -> np.ndarray:
    """Mask of replies with no content; built-in rewards give them 0."""
    return np.array([not r.strip() for r in responses], dtype=bool)


def positive(x: Any) -> bool:
    return x > 0


def probability(x: Any) -> bool:
    return 0 <= x <= 1
