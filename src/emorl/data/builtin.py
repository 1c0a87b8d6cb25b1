"""The built-in emotional-support task: statements written for emorl plus emotional first-person turns selected
from chitchat-dataset by a fixed, deterministic filter (see docs/data.md)."""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emorl.data.files import load_json_records
from emorl.data.records import Record
from emorl.utils import EmorlError

log = logging.getLogger(__name__)

SUPPORT_PROMPTS = Path(__file__).parent.parent / "assets" / "support_prompts.jsonl"


def default_records() -> list[Record]:
    """The built-in emotional-support task: the statements written for emorl (with reference replies), then
    emotional first-person turns from chitchat-dataset (no reference), without repeats. About 1 s."""
    return list(_default_records())


@functools.cache
def _default_records() -> tuple[Record, ...]:
    own = handwritten_records()
    keys = {dedup_key(r.prompt) for r in own}
    extra = [r for r in chitchat_records() if dedup_key(r.prompt) not in keys]
    log.debug("default data: %d written for emorl + %d from chitchat-dataset", len(own), len(extra))
    return tuple(own + extra)


def handwritten_records() -> list[Record]:
    """Client statements written for emorl (``assets/support_prompts.jsonl``, Apache-2.0 like the code)."""
    return load_json_records(SUPPORT_PROMPTS, "prompt", "reference")


# The chitchat-dataset filter. Casual chat between students, so most turns are not about feelings; a turn is
# kept when one of its messages says in the first person how the writer feels (or reports a loss), and it is
# not laughter, media talk, a hypothetical, a question, or addressed to the chat partner. See docs/data.md.
_EMOTIONS = ("stressed|stressed out|anxious|depressed|lonely|sad|upset|worried|scared|afraid|terrified|overwhelmed|"
             "heartbroken|exhausted|miserable|hurt|frustrated|nervous|hopeless|homesick|devastated|discouraged|"
             "insecure|burned out|burnt out|struggling|freaking out|panicking|ashamed|guilty|disappointed|drained|"
             "worn out|grieving|so alone|all alone")
_FEELINGS = "terrible|awful|lost|stuck|behind|alone|useless|worthless|empty"  # emotional only after "I feel"
_MODIFIERS = (r"(?:so |really |very |kind of |kinda |a little |a bit |pretty |super |just |always |still |feeling "
              r"|getting |been |honestly |totally |extremely |quite |more and more |too |starting to feel "
              r"|starting to get )*")
FIRST_PERSON_EMOTION = re.compile(
    r"\bi(?:'m| am|m| have been|'ve been| get| feel| keep feeling)\s+" + _MODIFIERS + f"(?:{_EMOTIONS})"
    r"\b(?! at\b| with\b| to (?:say|ask)\b| eater| i\b| that i\b)"  # "terrible at", "I'm afraid I don't know"
    r"|\bi(?: feel|'m feeling| am feeling| have been feeling|'ve been feeling)\s+" + _MODIFIERS + f"(?:{_FEELINGS})"
    r"\b(?! at\b| with\b)")
LOSS = re.compile(
    r"\bmy (?:\w+ )?(?:mom|dad|mother|father|grandma|grandpa|grandmother|grandfather|brother|sister|friend|dog|cat"
    r"|uncle|aunt|cousin|husband|wife|boyfriend|girlfriend) (?:just )?(?:passed away|died|broke up with me|is sick"
    r"|has cancer|got sick)")
_EXCLUDE = re.compile(
    r"\b(?:ha(?:ha)+\w*|hah\w*|lol|lmao|jk|xd|movies?|film|show|season|episode|netflix|marvel|avengers|batman|loki"
    r"|games?|book|song|fun|glad|excited|awesome|cute|love|thank goodness|not worried|never|would|if|you|your"
    r"|sorry|relief|great|amazing|interesting|cool|nice|good to know|computers?|siri|android|apple|icloud|instagram"
    r"|nasa|politics|competition|points|first place|win|spiders?|chimps?|potato\w*|crabs?|dream|when i'?m"
    r"|when i am)\b|[#@<>;:*()]|!!|[,\-]$", re.IGNORECASE)
# a message that stops mid-thought (the writer went on in the next message): "... as we continue to"
_UNFINISHED = re.compile(r"\b(?:the|a|an|to|that|there|as|in|be|with|and|but|or|of|for|will|not|super|next|"
                         r"two|\w)$", re.IGNORECASE)
_LEADING_FILLER = re.compile(r"^(?:(?:yeah|yea|ya|yes|yep|oh|ah+|um+|hmm+|well|same|same here|true|ok|okay|right"
                             r"|lol|wow|i know|and|but|so)\b[\s,.!]*)+", re.IGNORECASE)


def chitchat_records(conversations: Mapping[str, Any] | None = None) -> list[Record]:
    """Emotional first-person turns of chitchat-dataset (MIT, BYU PCC Lab), by a fixed deterministic filter.

    ``conversations`` defaults to the package's ``dataset.json`` ({id: {"messages": [[{"text": ...}, ...], ...]}}).
    Messages are scanned in file order. A message qualifies when it matches ``FIRST_PERSON_EMOTION`` or
    ``LOSS``; a short one (< 8 words) takes the next message of the same turn along. Leading fillers
    ("yeah", "oh", ...) are cut, then the text must be 40-240 characters, not a question, and free of
    ``_EXCLUDE``; repeats (same letters) are dropped.
    """
    if conversations is None:
        try:
            path = importlib.resources.files("chitchat_dataset") / "dataset.json"
            conversations = json.loads(path.read_bytes())
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise EmorlError("the built-in data set needs the 'chitchat-dataset' package (pip install "
                             f"chitchat-dataset), or set data.source to a file of your own ({e})") from None
    out: list[Record] = []
    seen: set[str] = set()
    for conv in conversations.values():
        for turn in conv["messages"]:
            texts = [m["text"] for m in turn]
            for i, text in enumerate(texts):
                low = text.lower()  # lower-case once, then case-sensitive patterns: ~2x faster than re.I
                if not (FIRST_PERSON_EMOTION.search(low) or ("my " in low and LOSS.search(low))):
                    continue
                text = " ".join(text.split())
                if len(text.split()) < 8 and i + 1 < len(texts):
                    text += (" " if text[-1:] in ".!" else ". ") + " ".join(texts[i + 1].split())
                text = _LEADING_FILLER.sub("", text).strip()
                if not 40 <= len(text) <= 240 or text.endswith("?") or _EXCLUDE.search(text) \
                        or _UNFINISHED.search(text):
                    continue
                key = dedup_key(text)
                if key not in seen:
                    seen.add(key)
                    out.append(Record(text[0].upper() + text[1:]))
    return out


def dedup_key(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())
