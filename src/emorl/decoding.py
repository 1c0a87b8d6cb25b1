"""The one decoding path: (method or mix, prompts, GenerationConfig, seed) -> replies.

Every consumer — the search objective, the evaluation, the Ray workers, ``emorl generate`` and the server — decodes
through :class:`Decoder` (built on :class:`~emorl.ensemble.EnsembleModel`), so a method's replies for a seed are the
same wherever they are made. What it owns:

* the prompt format (the base's chat template, system prompt and ``max_prompt_tokens``; an adapter folder records
  the ones it was trained with, :func:`prompt_config`),
* per-prompt weights (:func:`decode_routed`: a routed method's rows, computed by the router above this layer and
  handed down in :attr:`emorl.methods.MethodSpec.row_weights`),
* the EOS ids (:func:`emorl.models.eos_ids`) and the common random numbers (:mod:`emorl.sampling`),
* each mode's weight rule (:func:`~emorl.ensemble.mixing.weight_rule`: ``anchor="base"`` or the convex
  ``"none"``), and the base model as the anchored point w = 0 (the LoRA bank's zero slot),
* one set of logits processors: only temperature / top-k / top-p (and ``min_new_tokens``). A model's own
  ``generation_config`` (repetition penalty, no-repeat n-grams, ...) is never applied, here or in the training
  rollouts that still call transformers' ``generate`` (:func:`plain_generation_config`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emorl.config import GenerationConfig
from emorl.utils import EmorlError

if TYPE_CHECKING:
    from emorl.divergence import ReplyKL
    from emorl.methods import MethodSpec

__all__ = ["Decoder", "decode_routed", "decode_with", "generation_kwargs", "groups", "parse_mix",
           "plain_generation_config", "prompt_config"]


def generation_kwargs(gen: GenerationConfig) -> dict[str, Any]:
    """``EnsembleModel.generate`` keyword arguments from a :class:`~emorl.config.GenerationConfig`. Stop strings
    are kept in the reply (``include_stop``), as in the training rollouts: a sentence keeps its full stop."""
    return {"max_new_tokens": gen.max_new_tokens, "min_new_tokens": gen.min_new_tokens, "do_sample": gen.do_sample,
            "temperature": gen.temperature, "top_k": gen.top_k, "top_p": gen.top_p, "stop": list(gen.stop),
            "include_stop": True}


@contextlib.contextmanager
def plain_generation_config(model: Any) -> Iterator[None]:
    """Inside the block, transformers' ``generate`` on ``model`` sees a generation config holding only the token ids
    (eos / pad / bos / decoder start), so the model's own processors (``repetition_penalty``,
    ``no_repeat_ngram_size``, ``bad_words_ids``, ...) are not applied: the decoder never applies them either."""
    from transformers import GenerationConfig as HFGenerationConfig

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    old = getattr(lm, "generation_config", None)
    keep = {k: getattr(old, k, None) for k in ("eos_token_id", "pad_token_id", "bos_token_id",
                                                "decoder_start_token_id")}
    lm.generation_config = HFGenerationConfig(**{k: v for k, v in keep.items() if v is not None})
    try:
        yield
    finally:
        lm.generation_config = old


def prompt_config(folder: str | Path) -> dict[str, Any]:
    """The prompt format an adapter was trained with (``emorl.json``'s ``prompt``: system prompt,
    ``max_prompt_tokens``, form), or {} for an adapter saved before it was recorded."""
    from emorl.models import read_adapter_info

    return dict(read_adapter_info(folder).prompt or {})


def groups(weights: np.ndarray, decimals: int = 9) -> list[tuple[np.ndarray, list[int]]]:
    """[(weight vector, prompt indices)] for the distinct rows of ``weights``, in order of first appearance."""
    out: dict[tuple[float, ...], list[int]] = {}
    for i, w in enumerate(np.round(np.asarray(weights, dtype=np.float64), decimals)):
        out.setdefault(tuple(w.tolist()), []).append(i)
    return [(np.array(k), v) for k, v in out.items()]


def decode_routed(ens: Any, prompts: list[str], weights: Any, *, mode: str = "hidden", seed: int = 0,
                  anchor: str = "base", **gen: Any) -> tuple[list[str], list[int], list[str]]:
    """Replies, token counts and finish reasons ("eos", "stop", "length"), in prompt order, each prompt decoded with
    its own row of ``weights`` (B×K).

    Prompts that share their row are decoded together in one ``generate``, so a group's replies are exactly what
    ``generate`` gives for those prompts and that point (sampling draws its uniforms by a prompt's position in the
    call: within its group). The router's rule is base-anchored: its points lie in the anchored search's box."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(prompts), ens.n_adapters):
        raise EmorlError(f"per-prompt weights: expected shape ({len(prompts)}, {ens.n_adapters}), got {weights.shape}")
    texts: list[str] = [""] * len(prompts)
    lengths = [0] * len(prompts)
    finish = [""] * len(prompts)
    for w, idx in groups(weights):
        res = ens.generate([prompts[i] for i in idx], w, mode=mode, seed=seed, anchor=anchor, **gen)
        for j, i in enumerate(idx):
            texts[i] = res.texts[j]
            lengths[i] = int(res.lengths[j])
            finish[i] = res.finish[j]
    return texts, lengths, finish


class Decoder:
    """Decodes methods with one engine and one set of settings.

    One-policy baselines and single adapters are a one-adapter ensemble with weight 1 (exactly that adapter's
    model); the base is the anchored point w = 0 of any ensemble (the LoRA bank's zero slot: adapters off) or, in
    a run without adapters, an ensemble of none. So greedy and sampled decoding, the samplers and the seeds are
    identical across methods, and single-stream methods share their random numbers; only the model differs."""

    def __init__(self, base: Any, gen: GenerationConfig, base_adapter: dict[str, Path] | None = None, *,
                 require_metadata: bool = True) -> None:
        self.base = base
        self.gen = gen
        self.base_adapter = base_adapter or {}
        self.require_metadata = require_metadata
        self._ens: dict[tuple[str, ...], Any] = {}

    def ensemble(self, adapters: dict[str, Path]) -> Any:
        """The :class:`~emorl.ensemble.EnsembleModel` over ``adapters`` (loaded once, cached by name)."""
        from emorl.ensemble.model import EnsembleModel

        key = tuple(adapters)
        if key not in self._ens:
            self._ens[key] = EnsembleModel(self.base, dict(adapters), allow_empty=True,
                                           require_metadata=self.require_metadata)
        return self._ens[key]

    def generate(self, adapters: dict[str, Path], prompts: Sequence[str], weights: Any, mode: str, anchor: str,
                 seed: int, **kw: Any) -> Any:
        """A mix of ``adapters`` (G×K or K weights) with this decoder's generation settings."""
        return self.ensemble(adapters).generate(list(prompts), weights, mode=mode, anchor=anchor, seed=seed,
                                                **(generation_kwargs(self.gen) | kw))

    def result(self, spec: MethodSpec, prompts: Sequence[str], seed: int, **kw: Any) -> Any:
        """The :class:`~emorl.ensemble.GenerationResult` of one method for one seed (not for routed methods, whose
        prompts each have their own weights: use :meth:`decode`)."""
        if spec.kind == "routed":
            raise EmorlError(f"{spec.name}: a routed method picks weights per prompt; decode it with "
                             f"`emorl generate --run RUN --weights auto`")
        if spec.kind == "base":
            adapters = dict(self.base_adapter)
            return self.generate(adapters, prompts, [0.0] * len(adapters), "hidden", "base", seed, **kw)
        return self.generate(spec.adapters, prompts, spec.weights, spec.mode or "hidden",
                             getattr(spec, "anchor", "base"), seed, **kw)

    def decode(self, spec: MethodSpec, prompts: Sequence[str], seed: int) -> tuple[list[str], list[int]]:
        """Replies and their token counts of one method for one seed (:meth:`decode_finish` without the rest)."""
        texts, lengths, _, _ = self.decode_finish(spec, prompts, seed)
        return texts, lengths

    def decode_finish(self, spec: MethodSpec, prompts: Sequence[str], seed: int, kl_rows: int = 0
                      ) -> tuple[list[str], list[int], list[str], ReplyKL | None]:
        """Replies, their token counts, how each ended ("eos", "stop" or "length"; the report's ended %) and,
        with ``kl_rows`` = n > 0, the first n replies' per-token KL to the base and its seconds
        (:class:`~emorl.divergence.ReplyKL`, from this decode's own scores: the replies are exactly those without
        it), else None — of one method for one seed. A routed method is decoded with its per-prompt
        ``row_weights`` (the caller sets them from the router) and gets no KL."""
        if spec.kind == "routed":
            if spec.row_weights is None:
                raise EmorlError(f"{spec.name}: no per-prompt weights; the caller routes the prompts first "
                                 f"(emorl.evaluate.with_routes)")
            texts, lengths, finish = decode_routed(self.ensemble(spec.adapters), list(prompts), spec.row_weights,
                                                   mode=spec.mode or "hidden", seed=seed, **generation_kwargs(self.gen))
            return texts, lengths, finish, None
        n = min(int(kl_rows), len(prompts))
        res = self.result(spec, prompts, seed, **({"output_scores": n} if n > 0 else {}))
        kl = None
        if n > 0:
            from emorl.divergence import timed_reply_kl

            kl = timed_reply_kl(self.base, res, list(prompts)[:n], self.gen)
        return list(res.texts), [int(x) for x in res.lengths.tolist()], list(res.finish), kl


def decode_with(decoder: Decoder) -> Any:
    """``decode(specs, prompts, seeds, kl_rows=0)`` yielding ``(spec, [(seed, replies, lengths, seconds, finish,
    kl), ...])`` per method, one method after another in this process (the local executor's and a Ray worker's
    way); ``finish``: how each reply ended ("eos", "stop" or "length"); ``kl``: the first ``kl_rows`` replies'
    per-token KL to the base (:class:`~emorl.divergence.ReplyKL`) or None (:meth:`Decoder.decode_finish`)."""
    import time

    def decode(specs: list[Any], prompts: list[str], seeds: list[int], kl_rows: int = 0
               ) -> Iterator[tuple[Any, list[Any]]]:
        for s in specs:
            out = []
            for seed in seeds:
                t0 = time.perf_counter()
                texts, lengths, finish, kl = decoder.decode_finish(s, prompts, seed, kl_rows)
                seconds = time.perf_counter() - t0 - (kl.seconds if kl is not None else 0.0)  # the decode's own
                out.append((seed, texts, lengths, seconds, finish, kl))
            yield s, out

    return decode


# A searched mix is named by its mode and, where the weight rule is not the run's default, its anchor: "hidden" is
# EMORL as configured (search.anchor, default base-anchored), "hidden-convex" the paper's convex mix, "params" task
# arithmetic (W0 + sum w_k dW_k), "params-convex" the parameter average (sum w = 1). "probs" is always convex.
CONVEX_SUFFIX = "-convex"


def parse_mix(key: str, default_anchor: str = "base") -> tuple[str, str]:
    """(mode, anchor) of a search key such as ``hidden``, ``hidden-convex``, ``params``, ``params-convex``."""
    from emorl.ensemble.mixing import MODES, weight_rule

    mode, anchor = (key.removesuffix(CONVEX_SUFFIX), "none") if key.endswith(CONVEX_SUFFIX) else (key, default_anchor)
    if mode not in MODES:
        raise EmorlError(f"mode {key!r}: choose one of {', '.join(MODES)}, optionally with {CONVEX_SUFFIX!r} for the "
                         f"convex (sum w = 1) form, e.g. hidden-convex, params-convex")
    weight_rule(mode, anchor)  # validates the anchor
    return mode, "none" if mode == "probs" else anchor
