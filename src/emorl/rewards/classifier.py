"""``hf-classifier``: any ``AutoModelForSequenceClassification`` (path or hub id) as a reward, e.g. the paper's
bert-empathy (``pair: true, transform: clamp``) or a toxicity / sentiment / NLI classifier.

The classifier reads the reply alone, or the (statement, reply) pair with ``pair: true``; the logit of one
label becomes a score in [0, 1] by ``sigmoid``, ``softmax`` (over all labels) or ``clamp`` (to [0, 1]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emorl.rewards.base import Options, RewardError, empty, load_pretrained, placement, positive, register_reward

if TYPE_CHECKING:
    from emorl.models import Base


@register_reward("hf-classifier")
class HFClassifier:
    """Score = transform(logits)[label] of a sequence classifier on the reply (or the statement/reply pair)."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        self.name = name
        self.where = f"objectives.{name}"
        self.path = opts.get("model", kind=str, check=bool, expect="a model path or hub id")
        self.pair = opts.get("pair", False, bool)
        self.transform = opts.get("transform", "sigmoid", str, choices=("sigmoid", "softmax", "clamp"))
        self.label_opt = opts.get("label", None, (int, str))
        self.max_length = opts.get("max_length", 512, int, check=positive, expect="an integer >= 1")
        self.batch_size = opts.get("batch_size", 32, int, check=positive, expect="an integer >= 1")
        self.device, self.dtype = placement(opts, base)
        self.model: Any = None
        self.tok: Any = None
        self.label = 0

    def load(self) -> None:
        if self.model is not None:
            return
        model, tok = load_pretrained("sequence classifier", "AutoModelForSequenceClassification", self.path,
                                     self.device, self.dtype, self.where,
                                     hint="; for a custom architecture use `type: python`")
        self.label = self._resolve_label(model.config)
        self.model, self.tok = model, tok

    def _resolve_label(self, cfg: Any) -> int:
        n = int(cfg.num_labels)
        names = {str(v): int(k) for k, v in (cfg.id2label or {}).items()}
        listing = ", ".join(f"{i}={names_i}" for names_i, i in sorted(names.items(), key=lambda kv: kv[1]))
        lab = self.label_opt
        if lab is None:
            if n == 1:
                return 0
            if self.transform == "softmax" and n == 2:
                return 1
            raise RewardError(f"{self.where}.label: {self.path} has {n} labels ({listing}); say which one is the "
                              f"reward, by index or name")
        if isinstance(lab, str):
            if lab not in names:
                raise RewardError(f"{self.where}.label: {lab!r} is not a label of {self.path}; labels: {listing}")
            return names[lab]
        if not 0 <= lab < n:
            raise RewardError(f"{self.where}.label: index {lab} is out of range; {self.path} has {n} labels "
                              f"({listing})")
        return lab

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        self.load()
        out = np.zeros(len(responses))
        for s in range(0, len(responses), self.batch_size):
            r = list(responses[s: s + self.batch_size])
            args = (list(prompts[s: s + self.batch_size]), r) if self.pair else (r,)
            enc = self.tok(*args, truncation=True, max_length=self.max_length, padding=True,
                           return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            if self.transform == "softmax":
                v = logits.softmax(-1)[:, self.label]
            elif self.transform == "sigmoid":
                v = logits[:, self.label].sigmoid()
            else:
                v = logits[:, self.label].clamp(0.0, 1.0)
            out[s: s + len(r)] = v.cpu().numpy()
        out[empty(list(responses))] = 0.0
        return out
