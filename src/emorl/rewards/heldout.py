"""Offline held-out judges for ``eval.judges`` (docs/rewards.md, "Held-out judges"): scorers built apart from the
training rewards, so a policy fitted to those cannot have fitted these.

* ``empathy-heldout``: the empathy scorer with reference banks written separately and in another voice
  (:mod:`emorl.rewards.banks_heldout`). Same encoder, different references: it tells whether a gain in empathy
  carries over from the training banks' phrasing to other phrasings of the same stance.
* ``reflection-pmi``: how much the client's statement explains the reply under the base language model (another
  model family than the MiniLM of ``reflection``): the pointwise mutual information ``mean token log p(reply |
  statement) - mean token log p(reply | another statement)``, squashed by a logistic and multiplied by the same
  copy penalty as ``reflection`` (a verbatim copy is perfectly explained by its statement and would win otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from emorl.rewards import banks, banks_heldout
from emorl.rewards.base import Options, RewardError, empty, positive, probability, register_reward
from emorl.rewards.text import Empathy, _sigmoid, copy_ratio

if TYPE_CHECKING:
    from emorl.models import Base

CONTEXT = "A person said: \"{statement}\"\nA caring listener replied:"
NEUTRAL = "Someone is talking about an ordinary day.\nA caring listener replied:"


@register_reward("empathy-heldout")
class EmpathyHeldout(Empathy):
    """``empathy`` with the held-out reference banks as defaults (``empathic``/``dismissive`` still override)."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        super().__init__(name, opts, base)
        # the parent's defaults are the training banks: replace them (a list given in the spec is kept)
        if self.empathic == list(banks.EMPATHIC):
            self.empathic = list(banks_heldout.EMPATHIC)
        if self.dismissive == list(banks.DISMISSIVE):
            self.dismissive = list(banks_heldout.DISMISSIVE)


@register_reward("reflection-pmi")
class ReflectionPMI:
    """``sigmoid((PMI - center) / temperature) * (1 - copy_penalty * copy**2)`` under the frozen base model."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        self.name = name
        self.center = opts.get("center", 0.0, float)
        self.temperature = opts.get("temperature", 0.5, float, check=positive, expect="a number > 0")
        self.copy_penalty = opts.get("copy_penalty", 1.0, float, check=probability, expect="a number in [0, 1]")
        self.micro_batch = opts.get("micro_batch", 16, int, check=positive, expect="an integer >= 1")
        self.max_reply_tokens = opts.get("max_reply_tokens", 128, int, check=positive, expect="an integer >= 1")
        if base is None or base.is_seq2seq:
            raise RewardError(f"{opts.where}.type: 'reflection-pmi' scores replies under the run's causal base model; "
                              f"build it with build_reward(..., base=load_base(...))")
        self.base = base

    @torch.inference_mode()
    def pmi(self, prompts: list[str], replies: list[str]) -> np.ndarray:
        """Mean token log-likelihood ratio of each reply with its statement vs a neutral context (NaN if empty)."""
        from emorl.models import adapters_disabled
        from emorl.rewards.lm import causal_nll
        from emorl.utils import eval_mode

        tok = self.base.tokenizer
        tgt = [t[: self.max_reply_tokens] for t in tok([" " + r.strip() for r in replies],
                                                         add_special_tokens=False)["input_ids"]]
        ctx = tok([CONTEXT.format(statement=p.strip()) for p in prompts], add_special_tokens=False)["input_ids"]
        neutral = tok([NEUTRAL] * len(replies), add_special_tokens=False)["input_ids"]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        model = self.base.model
        with adapters_disabled(model), eval_mode(model):
            with_statement = causal_nll(model, ctx, tgt, pad, self.base.device, self.micro_batch, share_prefix=False)
            without = causal_nll(model, neutral, tgt, pad, self.base.device, self.micro_batch)
        return without - with_statement

    def __call__(self, prompts: list[str], replies: list[str]) -> np.ndarray:
        pmi = self.pmi(list(prompts), list(replies))
        copy = np.array([copy_ratio(p, r) for p, r in zip(prompts, replies, strict=True)])
        scores = _sigmoid((np.nan_to_num(pmi, nan=-1e9) - self.center) / self.temperature)
        scores = scores * (1.0 - self.copy_penalty * copy**2)
        scores[empty(list(replies))] = 0.0
        return scores
