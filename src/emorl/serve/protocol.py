"""Requests and replies of ``emorl serve`` in OpenAI's shapes: validation with errors that name the field and
the fix (:class:`ApiError`, OpenAI's ``{"error": {...}}`` body), and the chat completion / chunk objects.

The chat request's steering extension (top level, so the ``openai`` client's ``extra_body`` carries it)::

    "emorl": {"weights": {"reflection": 0.8, "empathy": 0.5, "fluency": 0.1},   # or a list in objective order
              "mode": "hidden",        # hidden | logits | probs | params (model "emorl" only)
              "anchor": "base",        # base: shifts of the base at strength w (w = 0 is the base); none: convex
              "top_k": 50}             # sampling filter (default: the run's eval.generation.top_k)
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from emorl.ensemble.pairs import PairSpec

MAX_N = 16
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_SCORE_PAIRS = 64
ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI fields this server cannot honour: refused when set to anything but their "off" value
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None,), "tools": (None, []), "tool_choice": (None, "none"),
               "functions": (None, []), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """A client error: HTTP ``status`` and OpenAI's error object (message, type, param, code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param, "invalid_value")


def _number(body: dict[str, Any], key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise bad(key, f"expected a number, got {v!r}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad(key, f"{v} is out of range; give {'>' if lo_open else '>='} {lo} and <= {hi}")
    return float(v)


def _int(body: dict[str, Any], key: str, lo: int, hi: int, what: str = "") -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"expected an integer, got {v!r}")
    if not lo <= v <= hi:
        raise bad(key, f"{v} is out of range; give an integer from {lo} to {hi}{what}")
    return v


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI content parts of type text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(
            p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(where, "expected a string (or a list of {\"type\": \"text\", \"text\": ...} parts)")


def parse_weights(raw: Any, objectives: list[str], allow_zero: bool = False) -> list[float]:
    """Weights as a {objective: w} object naming every objective, or a list in objective order."""
    names = ", ".join(objectives)
    if isinstance(raw, dict):
        unknown = [k for k in raw if k not in objectives]
        if unknown:
            raise bad("emorl.weights", f"unknown objective(s) {unknown}; this run's objectives are {names}")
        missing = [o for o in objectives if o not in raw]
        if missing:
            raise bad("emorl.weights", f"no weight for {missing}; give one number per objective ({names}), 0 to "
                                       "leave one out")
        values = [raw[o] for o in objectives]
    elif isinstance(raw, list):
        if len(raw) != len(objectives):
            raise bad("emorl.weights", f"{len(raw)} weights given, but this run has {len(objectives)} objectives "
                                       f"({names}); give one per objective, in that order, or an object by name")
        values = list(raw)
    else:
        raise bad("emorl.weights", f"expected an object {{objective: weight}} or a list of {len(objectives)} numbers")
    out = []
    for o, v in zip(objectives, values, strict=True):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise bad("emorl.weights", f"weight for {o} is {v!r}; expected a number")
        if not math.isfinite(v):
            raise bad("emorl.weights", f"weight for {o} is {v}; weights must be finite numbers")
        if v < 0:
            raise bad("emorl.weights", f"weight for {o} is {v}; weights must be >= 0")
        out.append(float(v))
    if not any(out) and not allow_zero:
        raise bad("emorl.weights", "all weights are zero, so no adapter contributes; give at least one positive "
                                   "weight (or use anchor \"base\", where w = 0 is the base model)")
    return out


@dataclass
class ChatRequest:
    """A validated chat completion request, ready to become a :class:`~emorl.serve.engine.Job`."""

    model: str
    key: str  # batch key: mixing mode, "+base" if it needs the base stream
    mode: str
    anchor: str
    weights: dict[str, float] | None  # the objective weights used (after normalisation); None for base
    pairs: list[PairSpec]
    stream: bool
    include_usage: bool
    seed: int | None
    prompt_tokens: int

    def extension(self) -> dict[str, Any]:
        return {"mode": self.mode, "anchor": self.anchor, "weights": self.weights, "seed": self.seed}


def last_user(body: Any) -> str | None:
    """The last user message's text, if the body has one (the router's input for ``"weights": "auto"``)."""
    msgs = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(msgs, list):
        return None
    for m in reversed(msgs):
        if isinstance(m, dict) and m.get("role") == "user":
            try:
                return _text(m.get("content"), "messages")
            except ApiError:
                return None
    return None


def parse_messages(msgs: Any, engine: Any, max_tokens: int) -> tuple[str, str, int]:
    """The whole conversation through the chat template: (model input text, last user message, its tokens).

    The system prompt is the request's (``system`` / ``developer``), else the run's. Turns are kept in order;
    while the prompt is over the limit (the model's context minus ``max_tokens``, or ``--max-prompt-tokens``) the
    oldest turns are dropped first — never the system prompt nor the last user message. A single user message
    gives exactly the text ``emorl generate`` decodes for that statement."""
    from emorl.data import format_prompts

    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "required: a non-empty list of {\"role\": ..., \"content\": ...} objects")
    system = engine.ens.base.config.system_prompt
    turns: list[dict[str, str]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}]", f"expected an object with a role in {', '.join(ROLES)} and a content")
        text = _text(m.get("content"), f"messages[{i}].content")
        if m["role"] in ("system", "developer"):
            system = text
        elif m["role"] in ("user", "assistant"):  # tool turns carry no text the model was trained on: left out
            turns.append({"role": m["role"], "content": text})
    last = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last is None or not turns[last]["content"].strip():
        raise bad("messages", "needs a user message with non-empty content (the client statement)")
    turns = turns[: last + 1]
    statement = turns[-1]["content"]
    tok = engine.request_tokenizer
    s2s = engine.ens.base.is_seq2seq
    limit = min(engine.prompt_limit, engine.context - max_tokens)

    def render(ts: list[dict[str, str]]) -> str:
        if len(ts) == 1 or s2s or not getattr(tok, "chat_template", None):
            return format_prompts(tok, [ts[-1]["content"]], s2s, system)[0]
        head = [{"role": "system", "content": system}] if system else []
        return tok.apply_chat_template(head + ts, tokenize=False, add_generation_prompt=True)

    while True:
        prompt = render(turns)
        n_tok = len(tok(prompt, add_special_tokens=s2s)["input_ids"])
        if n_tok <= limit or len(turns) == 1:
            break
        turns = turns[1:]  # the oldest turn goes first
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
    if n_tok > limit:
        raise bad("messages", f"the prompt is {n_tok} tokens (chat template and system prompt included); this server "
                              f"accepts at most {limit} with max_tokens {max_tokens} (the model's context of "
                              f"{engine.context} minus max_tokens, or --max-prompt-tokens). Shorten the last "
                              "message or lower max_tokens")
    return prompt, statement, n_tok


def parse_chat(body: Any, engine: Any, routed_weights: list[float] | None = None) -> ChatRequest:
    """Validate a /v1/chat/completions body against the run (``engine``); raises :class:`ApiError`.
    ``routed_weights``: the router's weights for ``"weights": "auto"`` (computed on the engine's worker)."""
    from emorl.ensemble.mixing import ANCHORS, MODES, weight_rule

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", f"required: one of {', '.join(engine.methods)}")
    method = engine.methods.get(model)
    if method is None:
        raise ApiError(404, f"model: {model!r} is not served by this run; choose one of {', '.join(engine.methods)} "
                            "(GET /v1/models)", "model", "model_not_found")
    for key, off in UNSUPPORTED.items():
        if body.get(key) not in off:
            raise bad(key, "not supported by emorl serve; leave it out")
    ext = body.get("emorl") or {}
    if not isinstance(ext, dict):
        raise bad("emorl", "expected an object like {\"weights\": {...}, \"mode\": \"hidden\"}")
    unknown = [k for k in ext if k not in ("weights", "mode", "anchor", "top_k")]
    if unknown:
        raise bad("emorl", f"unknown field(s) {unknown}; known: weights, mode, anchor, top_k")

    # reply length first: the prompt may take the model's context minus it
    n = _int(body, "n", 1, MAX_N) or 1
    max_tokens = _int(body, "max_completion_tokens", 1, engine.max_tokens, " (this server's --max-tokens)")
    max_tokens = max_tokens or _int(body, "max_tokens", 1, engine.max_tokens, " (this server's --max-tokens)")
    max_tokens = max_tokens or engine.default_max_tokens
    prompt, statement, n_tok = parse_messages(body.get("messages"), engine, max_tokens)

    # weights and mode
    gen = engine.cfg.eval.generation
    mode_req, anchor_req = ext.get("mode"), ext.get("anchor")
    if mode_req is not None and mode_req not in MODES:
        raise bad("emorl.mode", f"{mode_req!r}; choose one of {', '.join(MODES)}")
    if anchor_req is not None and anchor_req not in ANCHORS:
        raise bad("emorl.anchor", f"{anchor_req!r}; choose 'base' (each adapter's shift of the base at strength w, "
                                  "w = 0 is the base) or 'none' (the convex mix: weights rescaled to sum 1)")
    if method.kind == "mix":
        for f, req, have in (("mode", mode_req, method.mode), ("anchor", anchor_req, method.anchor)):
            if not method.free and req is not None and req != have:
                raise bad(f"emorl.{f}", f"model {model!r} is {f} {have!r}; use model \"emorl\" to choose the {f}")
        mode = mode_req or method.mode or "hidden"
        anchor = "none" if mode == "probs" else anchor_req or (method.anchor if not mode_req else None) or \
            engine.cfg.search.anchor
        routed = ext.get("weights") == "auto"
        if routed:  # per-prompt weights from the run's router (emorl route): base-anchored, in [0, w_max]^K
            if mode != "hidden":
                raise bad("emorl.weights", "\"auto\" (the router) picks weights for mode \"hidden\" only")
            anchor = "base"
        rule = weight_rule(mode, anchor)
        if routed:
            if routed_weights is None:
                raise bad("emorl.weights", "\"auto\" needs the router's weights (computed by the server first)")
            weights = list(routed_weights)
        elif ext.get("weights") is not None:
            weights = parse_weights(ext["weights"], engine.objectives, allow_zero=rule == "anchored")
        else:
            found = [s for s in engine.searched.values() if s["mode"] == mode and s["anchor"] == anchor]
            if not found:
                raise bad("emorl.weights", f"this run has no searched weights for mode {mode!r} with anchor "
                                           f"{anchor!r} (`emorl search --mode ...`); give emorl.weights")
            weights = [found[0]["weights"][o] for o in engine.objectives]
        if rule == "convex":
            total = sum(weights)
            weights = [w / total for w in weights]
        full = weights + [0.0] * (len(engine.adapters) - len(weights))
        needs_base = mode != "params" and rule == "anchored" and abs(sum(weights) - 1.0) > 0
        key = mode + ("+base" if needs_base else "")
    else:
        for f in ("weights", "mode", "anchor"):
            if ext.get(f) is not None:
                raise bad(f"emorl.{f}", f"model {model!r} is one trained policy; weights, modes and anchors apply to "
                                        "the mixes (model \"emorl\", \"soups\", \"logits\", ...)")
        mode, anchor, weights = "hidden", "base", None
        full = [1.0 if a == method.adapter else 0.0 for a in engine.adapters]  # base: all 0, the base stream
        key = "hidden+base" if method.kind == "base" else "hidden"

    # sampling settings: the request's, else the run's evaluation settings
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _int(ext, "top_k", 0, 1_000_000)
    do_sample = gen.do_sample if temperature is None else temperature > 0
    seed = _int(body, "seed", 0, 2**63 - 1)
    if do_sample and seed is None:
        seed = secrets.randbelow(2**31)  # OpenAI: no seed = a fresh draw; returned so the reply can be reproduced
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or any(
            not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad("stop", f"expected a string or a list of at most {MAX_STOP} non-empty strings of at most "
                          f"{MAX_STOP_CHARS} characters")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "expected true or false")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options", "expected an object like {\"include_usage\": true}")
    settings = {"max_new_tokens": max_tokens, "do_sample": do_sample,
                "temperature": (temperature if temperature is not None else gen.temperature) if do_sample else 1.0,
                "top_k": (top_k if top_k is not None else gen.top_k) if do_sample else 0,
                "top_p": (top_p if top_p is not None else gen.top_p) if do_sample else 1.0,
                "seed": seed or 0, "stop": tuple(stops)}
    pairs = [PairSpec(prompt, full, row=j, **settings) for j in range(n)]
    return ChatRequest(model, key, mode, anchor,
                       dict(zip(engine.objectives, weights, strict=True)) if weights is not None else None,
                       pairs, stream, bool(opts.get("include_usage")), seed if do_sample else None, n_tok)


def parse_score(body: Any) -> tuple[list[str], list[str]]:
    """/v1/score: {"pairs": [{"statement": ..., "reply": ...}, ...]} -> (statements, replies)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    pairs = body.get("pairs")
    if not isinstance(pairs, list) or not pairs or len(pairs) > MAX_SCORE_PAIRS:
        raise bad("pairs", f"required: a list of 1 to {MAX_SCORE_PAIRS} {{\"statement\": ..., \"reply\": ...}} "
                           "objects")
    statements, replies = [], []
    for i, p in enumerate(pairs):
        if not isinstance(p, dict) or not isinstance(p.get("statement"), str) or not isinstance(p.get("reply"), str):
            raise bad(f"pairs[{i}]", "expected {\"statement\": string, \"reply\": string}")
        if not p["statement"].strip():
            raise bad(f"pairs[{i}].statement", "must not be empty")
        statements.append(p["statement"])
        replies.append(p["reply"])
    return statements, replies


# ------------------------------------------------------------------------------------------------ replies

def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(req: ChatRequest, cid: str, results: list[Any]) -> dict[str, Any]:
    completion_tokens = sum(len(r.token_ids) for r in results)
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
            "system_fingerprint": "emorl", "choices": [
                {"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                 "logprobs": None} for i, r in enumerate(results)],
            "usage": usage(req, completion_tokens), "emorl": req.extension()}


def usage(req: ChatRequest, completion_tokens: int) -> dict[str, int]:
    prompt = req.prompt_tokens * len(req.pairs)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


def chunk(req: ChatRequest, cid: str, created: int, choices: list[dict[str, Any]],
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "system_fingerprint": "emorl", "choices": choices, **(extra or {})}
