"""What a decode returns: G weight points x B prompts of replies, token ids and lengths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class GenerationResult:
    """Decoded replies for G weight points × B prompts.

    ``texts`` / ``token_ids`` / ``lengths`` drop the point axis when ``weights`` was one vector. Token ids are
    right-padded with the pad id after a row's end (EOS is kept; a matched stop string's tokens are kept in the
    ids, and in the text only with ``generate(include_stop=True)``). ``finish`` says how each row ended."""

    prompts: list[str]
    names: list[str]
    mode: str
    weights: np.ndarray  # (G, K) as used (after normalisation)
    all_texts: list[list[str]]  # G × B
    all_token_ids: torch.Tensor  # (G, B, T) long, pad after a row's end
    all_lengths: torch.Tensor  # (G, B) generated tokens per row, EOS included
    single: bool = False
    scores: torch.Tensor | None = None  # (G, B, T, V) mixed scores before sampling warpers, if requested
    stats: dict[str, Any] = field(default_factory=dict)
    anchor: str = "base"  # the weight rule applied: "base" (anchored) or "none" (convex; weights as rescaled)
    all_finish: list[list[str]] = field(default_factory=list)  # G × B: "eos", "stop" or "length"

    @property
    def texts(self) -> list[str] | list[list[str]]:
        return self.all_texts[0] if self.single else self.all_texts

    @property
    def token_ids(self) -> torch.Tensor:
        return self.all_token_ids[0] if self.single else self.all_token_ids

    @property
    def lengths(self) -> torch.Tensor:
        return self.all_lengths[0] if self.single else self.all_lengths

    @property
    def finish(self) -> list[str] | list[list[str]]:
        return self.all_finish[0] if self.single and self.all_finish else self.all_finish

    def records(self) -> list[dict[str, Any]]:
        """One dict per (point, prompt): prompt, weights, mode, reply — the rows of ``emorl generate``."""
        return [{"prompt": p, "weights": dict(zip(self.names, map(float, self.weights[g]), strict=True)),
                 "mode": self.mode, "anchor": self.anchor, "reply": self.all_texts[g][b]}
                for g in range(len(self.all_texts)) for b, p in enumerate(self.prompts)]
