"""``llm-judge``: a language model behind any OpenAI-compatible chat endpoint scores replies, as a held-out judge.

* ``mode: pointwise`` asks for an integer 1..``scale`` per (statement, reply) under a rubric (a built-in one per
  objective, or your text) and maps it to ``(s - 1) / (scale - 1)`` in [0, 1].
* ``mode: pairwise`` compares a reply with the reply of a ``reference`` method to the same statement (same seed),
  asked in both orders so a judge that prefers a position cancels out: win 1, tie 0.5, loss 0 per order, averaged.

Answers are parsed strictly (a JSON object and nothing else). Every answer is cached on disk under a hash of the
model and the exact messages (so per statement, reply and rubric), written atomically, so a re-run asks nothing
twice. Requests time out, are retried with exponential backoff on connection errors, timeouts, 429 and 5xx, and run
``concurrency`` at a time. See docs/rewards.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emorl.rewards.base import Options, RewardError, positive, register_reward
from emorl.utils import atomic_write_json, cache_dir

if TYPE_CHECKING:
    from emorl.models import Base

RUBRICS: dict[str, str] = {
    "empathy": "Empathy: does the reply recognise what the person feels, show care and make them feel heard? A "
               "reply that minimises, blames, changes the subject or invents a loss the person did not mention "
               "scores low.",
    "reflection": "Reflective listening: does the reply restate, in its own words, what the person said or meant, "
                  "without copying it and without adding facts the person did not give?",
    "fluency": "Fluency: is the reply grammatical, coherent English that reads naturally? Judge the language only.",
    "overall": "Overall quality as an experienced counsellor would judge it: the reply is empathic, reflects what "
               "the person said, stays on their topic, invents nothing, and reads naturally.",
}
SYSTEM = ("You are a careful, impartial judge of replies in an emotional-support conversation. You follow the rubric "
          "exactly and answer with a single JSON object and nothing else.")
POINTWISE = ("Rubric. {rubric}\n\n<statement>\n{prompt}\n</statement>\n\n<reply>\n{reply}\n</reply>\n\n"
             "Rate the reply on the rubric from 1 (worst) to {scale} (best). Answer with only a JSON object of the "
             "form {{\"score\": N}} where N is an integer from 1 to {scale}.")
PAIRWISE = ("Rubric. {rubric}\n\n<statement>\n{prompt}\n</statement>\n\n<reply_a>\n{a}\n</reply_a>\n\n"
            "<reply_b>\n{b}\n</reply_b>\n\nWhich reply is better on the rubric? Answer with only a JSON object of the "
            "form {{\"winner\": \"A\"}}, {{\"winner\": \"B\"}} or {{\"winner\": \"tie\"}}.")
CACHE_VERSION = 1
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class JudgeAnswerError(RewardError):
    """The judge answered something that is not the JSON object the prompt asked for."""


def _json_object(text: str) -> dict[str, Any]:
    t = text.strip()
    m = _FENCE.match(t)
    if m:
        t = m.group(1)
    try:
        obj = json.loads(t)
    except json.JSONDecodeError as e:
        raise JudgeAnswerError(f"not a JSON object ({e.msg})") from e
    if not isinstance(obj, dict):
        raise JudgeAnswerError(f"a JSON {type(obj).__name__}, not an object")
    return obj


def parse_score(text: str, scale: int) -> int:
    """``{"score": N}`` with N an integer in 1..scale (a code fence around it is allowed; nothing else is)."""
    obj = _json_object(text)
    s = obj.get("score")
    if set(obj) != {"score"} or isinstance(s, bool) or not isinstance(s, int | float) or s != int(s) \
            or not 1 <= s <= scale:
        raise JudgeAnswerError(f"expected {{\"score\": <integer 1..{scale}>}}, got {obj}")
    return int(s)


def parse_winner(text: str) -> str:
    """``{"winner": "A" | "B" | "tie"}`` (case-insensitive) -> ``"A"``, ``"B"`` or ``"tie"``."""
    obj = _json_object(text)
    w = obj.get("winner")
    if set(obj) != {"winner"} or not isinstance(w, str) or w.strip().lower() not in ("a", "b", "tie"):
        raise JudgeAnswerError(f"expected {{\"winner\": \"A\" | \"B\" | \"tie\"}}, got {obj}")
    w = w.strip().lower()
    return "tie" if w == "tie" else w.upper()


class ChatEndpoint:
    """POST ``{base_url}/chat/completions`` with a timeout, retrying transient failures with exponential backoff."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float, retries: int,
                 backoff: float, max_tokens: int, temperature: float, where: str):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.retries, self.backoff, self.where = model, retries, backoff, where
        self.max_tokens, self.temperature = max_tokens, temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.requests = 0  # HTTP requests sent, retries included

    def payload(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}

    def ask(self, messages: list[dict[str, str]]) -> str:
        """The text of the first choice; a RewardError once every retry has failed or on a non-retryable status."""
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.requests += 1
            try:
                r = self.client.post(self.url, json=self.payload(messages))
            except httpx.TimeoutException as e:
                last = f"no answer within the timeout ({type(e).__name__}); raise `timeout` or check the server"
                continue
            except httpx.TransportError as e:
                last = f"cannot reach it ({type(e).__name__}: {e}); is the server running, and is base_url right?"
                continue
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                hint = " (set the API key's environment variable, option api_key_env)" if r.status_code in (401, 403) \
                    else ""
                raise RewardError(f"{self.where}: {self.url} answered HTTP {r.status_code}{hint}: {r.text[:300]}")
            try:
                content = r.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise RewardError(f"{self.where}: {self.url} did not answer an OpenAI chat completion "
                                  f"(choices[0].message.content): {r.text[:300]}") from e
            if not isinstance(content, str):
                raise RewardError(f"{self.where}: {self.url} answered a non-text message content: {content!r}")
            return content
        raise RewardError(f"{self.where}: the judge endpoint {self.url} failed {self.retries + 1} time(s); "
                          f"last: {last}")

    def close(self) -> None:
        self.client.close()


class AnswerCache:
    """One small JSON file per question, named by the hash of (model, messages); written atomically."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    @staticmethod
    def key(model: str, messages: list[dict[str, str]], temperature: float) -> str:
        blob = json.dumps({"v": CACHE_VERSION, "model": model, "messages": messages, "temperature": temperature},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        if self.folder is None:
            return None
        p = self.path(key)
        try:
            return str(json.loads(p.read_text())["answer"]) if p.exists() else None
        except (json.JSONDecodeError, KeyError):
            return None  # a damaged entry is asked again and overwritten

    def put(self, key: str, answer: str) -> None:
        if self.folder is not None:
            atomic_write_json(self.path(key), {"answer": answer})


def _snip(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


@register_reward("llm-judge")
class LLMJudge:
    """An LLM judge over an OpenAI-compatible chat endpoint (pointwise rubric score, or pairwise vs a reference)."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        self.name = name
        self.where = opts.where
        self.base_url = opts.get("base_url", kind=str, check=lambda u: u.startswith(("http://", "https://")),
                                 expect="an http(s) URL such as http://127.0.0.1:8000/v1")
        self.model = opts.get("model", kind=str, check=bool, expect="the model name the endpoint serves")
        self.api_key_env = opts.get("api_key_env", None, str)
        self.mode = opts.get("mode", "pointwise", str, choices=("pointwise", "pairwise"))
        rubric = opts.get("rubric", name if name in RUBRICS else "overall", str, check=bool, expect="a rubric")
        self.rubric = RUBRICS.get(rubric, rubric)
        self.scale = opts.get("scale", 10, int, check=lambda x: x >= 2, expect="an integer >= 2")
        self.reference = opts.get("reference", None, str)
        if self.mode == "pairwise" and not self.reference:
            raise opts.error("reference", "pairwise mode compares with a reference method's replies; name it "
                                          "(e.g. `reference: uniform`)")
        if self.mode == "pointwise" and self.reference:
            raise opts.error("reference", "only pairwise mode has a reference method; drop it or set mode: pairwise")
        self.timeout = opts.get("timeout", 60.0, float, check=positive, expect="seconds > 0")
        self.retries = opts.get("retries", 3, int, check=lambda x: x >= 0, expect="an integer >= 0")
        self.backoff = opts.get("backoff", 1.0, float, check=lambda x: x >= 0, expect="seconds >= 0")
        self.concurrency = opts.get("concurrency", 4, int, check=positive, expect="an integer >= 1")
        self.max_tokens = opts.get("max_tokens", 64, int, check=positive, expect="an integer >= 1")
        self.temperature = opts.get("temperature", 0.0, float, check=lambda x: x >= 0, expect="a number >= 0")
        folder = opts.get("cache_dir", str(cache_dir() / "llm-judge"), str)
        self.cache = AnswerCache(Path(folder).expanduser() if folder else None)
        self.endpoint: ChatEndpoint | None = None

    def load(self) -> None:
        """Resolve the API key (the named variable must be set when named) and open the HTTP client."""
        if self.endpoint is not None:
            return
        key = None
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise RewardError(f"{self.where}.api_key_env: the environment variable {self.api_key_env} is not set; "
                                  f"export it with the endpoint's API key (or drop api_key_env for a server that "
                                  f"needs none)")
        self.endpoint = ChatEndpoint(self.base_url, self.model, key, self.timeout, self.retries, self.backoff,
                                     self.max_tokens, self.temperature, self.where)

    # ------------------------------------------------------------------------------------------- asking

    def _messages(self, user: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    def _ask_all(self, questions: list[list[dict[str, str]]], parse: Any, what: list[str]) -> list[Any]:
        """Parsed answers to every question: cached ones read, the others asked ``concurrency`` at a time."""
        self.load()
        assert self.endpoint is not None
        keys = [AnswerCache.key(self.model, q, self.temperature) for q in questions]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        answers = {k: a for k in first if (a := self.cache.get(k)) is not None}
        todo = [k for k in first if k not in answers]

        def one(k: str) -> tuple[str, str]:
            i = first[k]
            text = self.endpoint.ask(questions[i])  # type: ignore[union-attr]
            try:
                parse(text)
            except JudgeAnswerError as e:
                raise JudgeAnswerError(f"{self.where}: the judge's answer {_snip(text, 200)!r} to {what[i]} cannot "
                                       f"be parsed: {e}. Use a model that follows the format, or raise max_tokens "
                                       f"if the answer was cut") from None
            self.cache.put(k, text)
            return k, text

        if todo:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo))) as pool:
                for k, text in pool.map(one, todo):
                    answers[k] = text
        return [parse(answers[k]) for k in keys]

    def __call__(self, prompts: list[str], replies: list[str]) -> np.ndarray:
        if self.mode == "pairwise":
            raise RewardError(f"{self.where}: a pairwise llm-judge needs the reference method's replies; it runs "
                              f"only as a held-out judge (eval.judges), where emorl passes them (compare())")
        out = np.zeros(len(replies))
        idx = [i for i, r in enumerate(replies) if r.strip()]  # an empty reply scores 0, as with every built-in
        qs = [self._messages(POINTWISE.format(rubric=self.rubric, prompt=prompts[i], reply=replies[i],
                                              scale=self.scale)) for i in idx]
        what = [f"statement {_snip(prompts[i])!r}, reply {_snip(replies[i])!r}" for i in idx]
        scores = self._ask_all(qs, lambda t: parse_score(t, self.scale), what)
        out[idx] = (np.asarray(scores, float) - 1.0) / (self.scale - 1)
        return out

    def compare(self, prompts: list[str], replies: list[str], references: list[str]) -> np.ndarray:
        """Pairwise score of each reply against the reference reply to the same statement: the mean over the two
        orders of win 1 / tie 0.5 / loss 0. Identical replies tie without asking; an empty reply loses to a
        non-empty one."""
        if not len(prompts) == len(replies) == len(references):
            raise RewardError(f"{self.where}: {len(prompts)} statements, {len(replies)} replies, {len(references)} "
                              f"reference replies")
        out = np.full(len(replies), 0.5)
        ask = []
        for i, (r, ref) in enumerate(zip(replies, references, strict=True)):
            if r == ref:
                continue
            if not r.strip() or not ref.strip():
                out[i] = 0.0 if not r.strip() else 1.0
                continue
            ask.append(i)
        qs, what = [], []
        for i in ask:
            for a, b in ((replies[i], references[i]), (references[i], replies[i])):
                qs.append(self._messages(PAIRWISE.format(rubric=self.rubric, prompt=prompts[i], a=a, b=b)))
                what.append(f"statement {_snip(prompts[i])!r} (pairwise)")
        wins = self._ask_all(qs, parse_winner, what)
        value = {"A": 1.0, "B": 0.0, "tie": 0.5}
        for j, i in enumerate(ask):
            first, second = wins[2 * j], wins[2 * j + 1]  # the reply is A in the first order, B in the second
            out[i] = (value[first] + (1.0 - value[second])) / 2.0
        return out

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
