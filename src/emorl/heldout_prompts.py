"""Held-out prompts for ``eval.extra_sets``: further client statements that the built-in data (training, validation and
test splits alike) never uses, picked by a rule unlike the training filter, and a user's own prompt files.

``chitchat-heldout`` reads chitchat-dataset from its last conversation backwards (the built-in filter reads it
forwards) and keeps a message that *reports the writer's own situation* ("I have two exams tomorrow and ...",
"My car broke down again ..."): it starts with I'm / I am / I've / I have / I had / I got / I just / I was / I need /
I went / I spent / My, is 50-200 characters, is not a question, does not address the partner ("you"), is not a
hypothetical or an opinion (would, could, if, think), has no laughter, link or hashtag, is not about the chat task
itself (computers, chatting, points, place), and is **not** caught by the training filter
(no named first-person emotion, no reported loss) nor a repeat of a built-in prompt. So the set holds everyday
statements of mixed tone, light ones included, where the built-in data holds statements of feeling: a shift of
distribution a policy fitted to the built-in data may not carry over to (docs/rewards.md, "Held-out prompt sets").
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

from emorl.data import Record, load_csv_records, load_json_records
from emorl.utils import EmorlError

_OPENING = re.compile(r"^(?:i'm|im|i am|i've|ive|i have|i had|i got|i just|i was|i need|i went|i spent|my)\b",
                      re.IGNORECASE)
_SKIP = re.compile(r"\b(?:you|your|u|ur|lol|lmao|haha\w*|hah\w*|jk|would|could|if|think|computers?|chat\w*|mdcrew"
                   r"|points?|place)\b|https?:|www\.|[#@<>*]|\?", re.IGNORECASE)
_FILLER = re.compile(r"^(?:(?:yeah|yea|ya|yes|oh|ah+|um+|well|ok|okay|so|and|but)\b[\s,.!]*)+", re.IGNORECASE)
BUILTIN = "chitchat-heldout"


@functools.cache
def chitchat_heldout(n: int = 100) -> tuple[Record, ...]:
    """The first ``n`` messages that pass the rule above, reading conversations from the last one backwards."""
    from emorl.data.builtin import FIRST_PERSON_EMOTION, LOSS, dedup_key, default_records

    try:
        data = json.loads((importlib.resources.files("chitchat_dataset") / "dataset.json").read_bytes())
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise EmorlError(f"eval.extra_sets: source {BUILTIN!r} needs the 'chitchat-dataset' package (pip install "
                         f"chitchat-dataset), or give a file of your own (path: FILE) ({e})") from None
    seen = {dedup_key(r.prompt) for r in default_records()}
    out: list[Record] = []
    for conv in reversed(list(data.values())):
        for turn in conv["messages"]:
            for m in turn:
                text = _FILLER.sub("", " ".join(m["text"].split())).strip()
                low = text.lower()
                if not 50 <= len(text) <= 200 or not _OPENING.match(text) or _SKIP.search(text) \
                        or FIRST_PERSON_EMOTION.search(low) or LOSS.search(low):
                    continue
                key = dedup_key(text)
                if key in seen:
                    continue
                seen.add(key)
                out.append(Record(text[0].upper() + text[1:]))
                if len(out) == n:
                    return tuple(out)
    return tuple(out)


def set_prompts(name: str, spec: dict[str, Any]) -> list[str]:
    """The prompts of extra set ``name``: ``{source: chitchat-heldout, prompts: N}`` or ``{path: FILE.jsonl|.csv,
    prompt_field: prompt, prompts: N}``."""
    where = f"eval.extra_sets.{name}"
    if not isinstance(spec, dict):
        raise EmorlError(f"{where}: expected a mapping like {{path: my_prompts.jsonl}} or {{source: {BUILTIN}}}")
    unknown = set(spec) - {"source", "path", "prompt_field", "prompts", "methods"}
    if unknown:
        raise EmorlError(f"{where}.{sorted(unknown)[0]}: unknown key; valid keys: source, path, prompt_field, prompts, "
                         f"methods")
    n = spec.get("prompts")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise EmorlError(f"{where}.prompts: expected an integer >= 1 (or leave it out for all), got {n!r}")
    if spec.get("source") is not None:
        if spec["source"] != BUILTIN or "path" in spec:
            raise EmorlError(f"{where}.source: the built-in set is {BUILTIN!r} (without a path); for your own file "
                             f"give path: FILE instead")
        records = list(chitchat_heldout(n or 100))
    else:
        if not spec.get("path"):
            raise EmorlError(f"{where}: give path: FILE (a JSONL or CSV of prompts) or source: {BUILTIN}")
        path = Path(str(spec["path"])).expanduser()
        if not path.is_file():
            raise EmorlError(f"{where}.path: {path} is not a file")
        field = str(spec.get("prompt_field", "prompt"))
        loader = load_csv_records if path.suffix.lower() == ".csv" else load_json_records
        records = loader(path, field)
    prompts = list(dict.fromkeys(r.prompt for r in records if r.prompt.strip()))[: n or None]
    if not prompts:
        raise EmorlError(f"{where}: no prompts")
    return prompts
