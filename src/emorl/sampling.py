"""Reproducible sampling: stable seeds, per-row uniforms and inverse-CDF token choice.

A row's sampled tokens depend only on its own logits and its own uniforms, never on which other rows share the
batch: each adapter draws a (rows, max_new_tokens) block of uniforms from a generator seeded statelessly by
:func:`stable_seed` (seed, adapter name, step, purpose), and :class:`UniformSampler` picks token t of a row by
inverse-CDF sampling of transformers' warped distribution with that row's u[:, t]. Used by the trainer's
rollouts and (via :func:`choose`) by the ensemble decoder.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (ints, strings...) that is the same in every process (unlike ``hash()``)."""
    h = hashlib.sha256("\x1f".join(f"{type(p).__name__}:{p}" for p in parts).encode())
    return int.from_bytes(h.digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch's global RNG (CPU, and ``device`` if CUDA) seeded by ``seed``; restore it after."""
    dev = torch.device(device) if device is not None else None
    devices = [dev] if dev is not None and dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def uniforms(seed: int, rows: int, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, steps) float32 uniforms in [0, 1) from a CPU generator seeded by ``seed`` (the same on any device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, steps, generator=g).to(device)


def choose(scores: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """Greedy argmax, or inverse-CDF sampling of the warped distribution with the given uniforms (one per row).

    A token of probability 0 (masked by a warper) is never chosen."""
    if u is None:
        return scores.argmax(-1)
    probs = torch.softmax(scores, dim=-1)
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(u.to(cdf.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    tok = torch.searchsorted(cdf, x, right=True)[:, 0]
    return tok.clamp_(max=scores.shape[-1] - 1)


def warpers(temperature: float | None, top_k: int | None, top_p: float | None) -> Any:
    """transformers' sampling warpers in the order ``generate`` applies them (temperature, top-k, top-p)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs


class UniformSampler:
    """A ``generate`` logits processor that samples with given per-row uniforms ``u`` (rows, max_new_tokens).

    Pass it with ``do_sample=False``: it warps the scores (after generate's own processors such as min_new_tokens),
    chooses each row's token by inverse CDF with ``u[row, step]`` and returns scores that are -inf except at the
    chosen token, so greedy selection takes it."""

    def __init__(self, u: torch.Tensor, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None) -> None:
        self.u = u
        self.warp = warpers(temperature, top_k, top_p)
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.start, self.u.shape[1] - 1)
        if input_ids.shape[0] != self.u.shape[0]:
            raise ValueError(f"UniformSampler: {input_ids.shape[0]} rows but uniforms for {self.u.shape[0]}")
        tok = choose(self.warp(input_ids, scores), self.u[:, step].to(scores.device))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tok[:, None], 0.0)
