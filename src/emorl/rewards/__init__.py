"""Rewards: objects that score (client statement, reply) pairs in [0, 1], built from config specs.

>>> from emorl.rewards import build_rewards, score
>>> rewards = build_rewards({"empathy": {"type": "empathy"}, "short": {"type": "length", "target": 15}})
>>> score(rewards["empathy"], ["I lost my job."], ["I'm so sorry, that must be frightening."])

Built-in types: ``fluency``, ``perplexity``, ``reflection``, ``empathy``, ``hf-classifier``, ``python``,
``length``, ``nontoxic``, ``llm-judge``, and the held-out judges ``empathy-heldout`` and
``reflection-pmi``. Add your own with :func:`register_reward`. See docs/rewards.md.
"""

from emorl.rewards import classifier, heldout, llm_judge, lm, simple, text  # noqa: F401 - register the built-in types
from emorl.rewards.base import (
    REGISTRY,
    Options,
    Reward,
    RewardError,
    build_reward,
    build_rewards,
    clear_cache,
    register_reward,
    score,
)

__all__ = ["REGISTRY", "Options", "Reward", "RewardError", "build_reward", "build_rewards", "clear_cache",
           "register_reward", "score"]
