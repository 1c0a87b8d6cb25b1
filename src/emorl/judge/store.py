"""The blind A/B plan (which replies are compared, on which side) and the answers file, for ``emorl judge``.

An item is one (pair of methods, prompt, seed) with the two methods' replies from ``RUN/eval/replies``. Prompts
and their decoding seeds come from one seeded permutation shared by every pair (so ``--n`` takes a prefix and a
larger ``--n`` keeps the earlier items); sides alternate in random blocks of two along it (balanced within one
for any ``--n``); the order shown is a seeded shuffle. An item's id is a salted hash of everything it shows and
its sides, so the page can hold it without learning the methods, and an answer names exactly what was judged.
``RUN/judge/plan.json`` keeps every item ever planned (id -> methods and sides), which maps the answers of an
offline HTML file back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emorl.utils import EmorlError, append_jsonl, atomic_write_json, read_json_checked, read_jsonl

log = logging.getLogger("emorl.judge")

OVERALL = "overall"
CHOICES = ("left", "tie", "right")
PLAN_VERSION = 1
# what a rater reads for the default study's objectives; any other criterion is shown by its name
DESCRIPTIONS = {
    "reflection": "Which reply better reflects back what the speaker said (restates or paraphrases it)?",
    "empathy": "Which reply better shows understanding of how the speaker feels?",
    "fluency": "Which reply reads as more natural, fluent English?",
    OVERALL: "All things considered, which reply would you rather receive from a counsellor?",
}


def judge_dir(run: str | Path) -> Path:
    return Path(run) / "judge"


@dataclass(frozen=True)
class Item:
    """One blind comparison: ``a`` and ``b`` are the pair as the user gave it (a win counts for ``a``)."""

    id: str
    a: str
    b: str
    prompt_index: int
    seed: int
    prompt: str
    left: str  # the method whose reply is shown as "Reply A"
    left_reply: str
    right_reply: str

    @property
    def right(self) -> str:
        return self.b if self.left == self.a else self.a

    def public(self) -> dict[str, Any]:
        """What the page may see: no method names, no pair, no seed."""
        return {"id": self.id, "prompt": self.prompt, "left": self.left_reply, "right": self.right_reply}

    def meta(self) -> dict[str, Any]:
        """What ``plan.json`` keeps to map an answer back (the texts are in the answers themselves)."""
        return {"a": self.a, "b": self.b, "prompt_index": self.prompt_index, "seed": self.seed, "left": self.left,
                "right": self.right}


# ------------------------------------------------------------------------------------------- the run's replies

def evaluated(run: str | Path) -> dict[str, Any]:
    """``RUN/eval/results.json``, or a clear error when the run has not been evaluated."""
    from emorl.evaluate import load_results

    results = load_results(run)
    if not results or not results.get("methods"):
        raise EmorlError(f"{Path(run) / 'eval' / 'results.json'} is missing or empty: the run has not been evaluated. "
                         f"Evaluate it first: `emorl evaluate --run {run}`")
    return results


def parse_pairs(text: str, methods: list[str]) -> list[tuple[str, str]]:
    """``"emorl:uniform,emorl:soups"`` -> pairs, each method checked against the evaluated ones. A method name may
    hold ':' (``single:empathy``), so each pair is split where both sides are evaluated methods."""
    pairs: list[tuple[str, str]] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        pieces = part.split(":")
        splits = [(":".join(pieces[:i]), ":".join(pieces[i:])) for i in range(1, len(pieces))]
        found = [s for s in splits if s[0] in methods and s[1] in methods]
        if not found:
            unknown = [x for x in (splits[0] if len(splits) == 1 else ()) if x not in methods]
            what = f"unknown method {unknown[0]!r}" if unknown else "no split into two evaluated methods"
            raise EmorlError(f"--pairs: {part!r}: {what}; the run's evaluated methods are {', '.join(methods)} "
                             f"(write a pair as A:B, pairs separated by commas)")
        a, b = found[0]
        if a == b:
            raise EmorlError(f"--pairs: {part!r} compares {a!r} with itself; pair two different methods")
        if (a, b) in pairs or (b, a) in pairs:
            raise EmorlError(f"--pairs: {a}:{b} is listed twice")
        pairs.append((a, b))
    if not pairs:
        raise EmorlError(f"--pairs: give at least one pair A:B of evaluated methods ({', '.join(methods)})")
    return pairs


def load_replies(run: str | Path, results: dict[str, Any], method: str) -> dict[tuple[int, int], tuple[str, str]]:
    """(seed, prompt index) -> (prompt, reply) for one method, from ``RUN/eval/replies/<method>.jsonl`` (a method
    the evaluation decoded once for a twin, ``same_as``, reads the twin's file)."""
    name = results["methods"][method].get("same_as") or method
    path = Path(run) / "eval" / "replies" / f"{name}.jsonl"
    rows = read_jsonl(path)
    if not rows:
        raise EmorlError(f"{path} is missing or empty, so {method!r} has no replies to judge. Decode it again: "
                         f"`emorl evaluate --run {run} --methods {method} --force`")
    out: dict[tuple[int, int], tuple[str, str]] = {}
    count: dict[int, int] = {}
    for row in rows:
        seed = int(row["seed"])
        i = count.get(seed, 0)
        count[seed] = i + 1
        out[(seed, i)] = (str(row["prompt"]), str(row["reply"]))
    return out


def common_units(replies: dict[str, dict[tuple[int, int], tuple[str, str]]]) -> tuple[list[int], list[int]]:
    """The prompt indices and seeds every method was decoded on (the evaluation decodes all alike)."""
    keys = set.intersection(*(set(r) for r in replies.values()))
    prompts = sorted({i for _, i in keys})
    seeds = sorted({s for s, _ in keys})
    return [i for i in prompts if all((s, i) in keys for s in seeds)], seeds


def available_prompts(run: str | Path, results: dict[str, Any], pairs: list[tuple[str, str]]) -> int:
    methods = sorted({m for p in pairs for m in p})
    return len(common_units({m: load_replies(run, results, m) for m in methods})[0])


# ------------------------------------------------------------------------------------------- the plan

def _item_id(salt: str, a: str, b: str, seed: int, left: str, prompt: str, ra: str, rb: str) -> str:
    text = "\x1f".join([a, b, str(seed), left, prompt, ra, rb])
    return hmac.new(bytes.fromhex(salt), text.encode(), hashlib.sha256).hexdigest()[:16]


def plan_path(run: str | Path) -> Path:
    return judge_dir(run) / "plan.json"


def read_plan(run: str | Path) -> dict[str, Any]:
    """``plan.json``; made (with a new random salt for the item ids) the first time."""
    path = plan_path(run)
    if not path.exists():
        atomic_write_json(path, {"version": PLAN_VERSION, "salt": secrets.token_hex(16), "items": {}, "sessions": []})
    plan = read_json_checked(path, "the judge plan", f"delete {path} (answers already given stay in answers.jsonl)")
    if plan.get("version") != PLAN_VERSION:
        raise EmorlError(f"{path}: plan version {plan.get('version')}, this emorl writes {PLAN_VERSION}; delete it")
    return plan


def build_items(run: str | Path, pairs: list[tuple[str, str]], n: int | None, seed: int = 0,
                results: dict[str, Any] | None = None, salt: str | None = None) -> list[Item]:
    """The items to show, in the (seeded) order shown. Checks ``n`` against the prompts every method has."""
    results = results or evaluated(run)
    methods = sorted({m for p in pairs for m in p})
    replies = {m: load_replies(run, results, m) for m in methods}
    prompts, seeds = common_units(replies)
    if not prompts:
        raise EmorlError(f"the replies of {', '.join(methods)} share no (prompt, seed); evaluate them together: "
                         f"`emorl evaluate --run {run} --methods {' '.join(methods)} --force`")
    if n is not None and not 1 <= n <= len(prompts):
        raise EmorlError(f"--n {n}: the run's evaluation has {len(prompts)} prompts for {', '.join(methods)}; "
                         f"give --n between 1 and {len(prompts)} (or evaluate more prompts: eval.prompts)")
    n = len(prompts) if n is None else n
    order = list(prompts)
    rng = random.Random(f"emorl-judge:{seed}:prompts")
    rng.shuffle(order)  # one prefix for every pair
    unit_seeds = [rng.choice(seeds) for _ in order]  # and one decoding seed per prompt: the same units everywhere
    salt = salt or read_plan(run)["salt"]
    items = []
    for a, b in pairs:
        for s, i in ((s, i) for s in seeds for i in prompts):
            if replies[a][(s, i)][0] != replies[b][(s, i)][0]:
                raise EmorlError(f"{a!r} and {b!r} were evaluated on different prompts (seed {s}, prompt {i}: "
                                 f"{replies[a][(s, i)][0][:40]!r} vs {replies[b][(s, i)][0][:40]!r}); evaluate them "
                                 f"together: `emorl evaluate --run {run} --methods {a} {b} --force`")
        rng = random.Random(f"emorl-judge:{seed}:{a}:{b}")
        flips = [rng.random() < 0.5 for _ in range(0, len(order), 2)]
        for j, i in enumerate(order[:n]):
            left = a if (j % 2 == 0) != flips[j // 2] else b  # a left in one of each block of two
            s = unit_seeds[j]
            prompt, ra = replies[a][(s, i)]
            rb = replies[b][(s, i)][1]
            lr, rr = (ra, rb) if left == a else (rb, ra)
            items.append(Item(_item_id(salt, a, b, s, left, prompt, ra, rb), a, b, i, s, prompt, left, lr, rr))
    random.Random(f"emorl-judge:{seed}:order").shuffle(items)
    return items


def record_plan(run: str | Path, items: list[Item], settings: dict[str, Any]) -> dict[str, Any]:
    """Add these items to ``plan.json`` (every item ever planned stays: old answers and HTML files map back)."""
    plan = read_plan(run)
    plan["items"].update({it.id: it.meta() for it in items})
    plan["sessions"].append({**settings, "items": len(items), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    atomic_write_json(plan_path(run), plan)
    return plan


def criteria_for(results: dict[str, Any], chosen: list[str] | None = None) -> list[str]:
    """The run's objectives and "overall", or the user's own list."""
    crit = list(chosen) if chosen else [*results.get("objectives", []), OVERALL]
    if len(set(crit)) != len(crit) or not all(c.strip() for c in crit):
        raise EmorlError(f"--criteria {','.join(crit)}: give distinct, non-empty names")
    return crit


# ------------------------------------------------------------------------------------------- the answers

def verdict(choice: str, left: str, a: str) -> str:
    """A page's choice (left / tie / right) as the pair's verdict: "a", "tie" or "b"."""
    if choice == "tie":
        return "tie"
    return "a" if (choice == "left") == (left == a) else "b"


class AnswerStore:
    """``RUN/judge/answers.jsonl``: one line per answer, appended with fsync under a file lock (a killed writer
    loses at most its own line; a torn last line is cut before the next append)."""

    def __init__(self, run: str | Path) -> None:
        from filelock import FileLock

        self.path = judge_dir(run) / "answers.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file_lock = FileLock(str(self.path) + ".lock")

    def read(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def answered(self, rater: str) -> set[str]:
        return {r["item"] for r in self.read() if r.get("rater") == rater}

    def _cut_torn_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("%s: cutting a torn last line (%d bytes) left by a killed writer", self.path, len(data) - keep)
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())

    def add(self, item: Item | dict[str, Any], rater: str, choices: dict[str, str], criteria: list[str],
            source: str = "page") -> bool:
        """Record one answer; False (nothing written) when this rater already answered the item."""
        check_choices(choices, criteria)
        meta = item.meta() if isinstance(item, Item) else item
        with self._lock, self._file_lock:
            item_id = item.id if isinstance(item, Item) else meta["id"]
            if item_id in self.answered(rater):
                return False
            self._cut_torn_tail()
            record = {"item": item_id, "rater": rater, "a": meta["a"], "b": meta["b"], "left": meta["left"],
                      "right": meta["right"], "prompt_index": meta["prompt_index"], "seed": meta["seed"],
                      "choices": dict(choices), "verdicts": {c: verdict(v, meta["left"], meta["a"])
                                                             for c, v in choices.items()},
                      "source": source, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if isinstance(item, Item):
                record.update(prompt=item.prompt, replies={"left": item.left_reply, "right": item.right_reply})
            append_jsonl(self.path, record)
        return True


def check_choices(choices: Any, criteria: list[str]) -> None:
    if not isinstance(choices, dict) or set(choices) != set(criteria):
        got = sorted(choices) if isinstance(choices, dict) else type(choices).__name__
        raise EmorlError(f"choices: give one choice for each criterion {criteria}; got {got}")
    bad = {c: v for c, v in choices.items() if v not in CHOICES}
    if bad:
        raise EmorlError(f"choices: {bad}: each must be one of {', '.join(CHOICES)}")


def import_answers(run: str | Path, path: str | Path, rater: str | None = None) -> tuple[int, int]:
    """Merge a JSONL downloaded from the offline HTML page into ``answers.jsonl`` through ``plan.json``;
    returns (added, already there). Every line is checked before any is written."""
    plan = read_plan(run)["items"]
    rows = read_jsonl(path)
    if not rows:
        raise EmorlError(f"{path}: no answers in it (a JSONL file downloaded from the judge page)")
    checked = []
    for n, row in enumerate(rows, 1):
        item_id = row.get("item")
        if item_id not in plan:
            raise EmorlError(f"{path}:{n}: item {item_id!r} is not in {plan_path(run)}; was the page written for "
                             f"another run (`emorl judge --run RUN --html FILE` writes one per run)?")
        crit = list(row["choices"]) if isinstance(row.get("choices"), dict) else []
        if not crit:
            raise EmorlError(f"{path}:{n}: no choices in this answer (expected {{\"choices\": {{criterion: left|tie|"
                             f"right}}}})")
        try:
            check_choices(row["choices"], crit)
        except EmorlError as e:
            raise EmorlError(f"{path}:{n}: {e}") from e
        checked.append((item_id, rater or str(row.get("rater") or "rater"), row["choices"], crit))
    store = AnswerStore(run)
    added = sum(store.add({"id": i, **plan[i]}, r, c, crit, source="html") for i, r, c, crit in checked)
    return added, len(checked) - added


def session_settings(pairs: list[tuple[str, str]], n: int, seed: int, rater: str, criteria: list[str]) -> dict:
    return {"pairs": [[a, b] for a, b in pairs], "n": n, "seed": seed, "rater": rater, "criteria": criteria}

