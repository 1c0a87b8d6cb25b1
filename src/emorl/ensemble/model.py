"""EnsembleModel: one frozen base + K LoRA adapters, decoded together with mixing weights.

>>> ens = EnsembleModel.from_run("runs/default")                       # adapters RUN/adapters/<objective>/
>>> res = ens.generate(["I lost my job today."], [0.8, 0.5, 0.1])      # hidden-state mixing (EMORL), greedy
>>> res.texts                                                           # one reply per prompt
>>> res = ens.generate(prompts, [[1, 0, 0], [0.5, 0.5, 0]], mode="logits", do_sample=True, seed=0)
>>> res.texts[1][0]                                                     # point 1, prompt 0

No copy of the base is made: the adapters live on the one PeftModel and run as a :func:`lora_bank`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emorl.ensemble.chunk import DecodeSpec, decode_chunk, default_budget, derive_chunking
from emorl.ensemble.kv import cache_bytes_per_row_token
from emorl.ensemble.mixing import MODES, check_weights, weight_rule
from emorl.ensemble.result import GenerationResult
from emorl.ensemble.streams import Head, Stream, cpu_row_padding
from emorl.lora_bank import BASE_SLOT, lora_bank
from emorl.sampling import uniforms
from emorl.utils import EmorlError

log = logging.getLogger(__name__)


class EnsembleModel:
    """K LoRA adapters on one base, decoded together (modes ``hidden``, ``logits``, ``probs``, ``params``)."""

    def __init__(self, base: Any, adapters: dict[str, str | Path] | None = None, *,
                 require_metadata: bool = True, allow_empty: bool = False) -> None:
        """``adapters``: name -> adapter folder (checked: same base fingerprint, emorl.json present unless
        ``require_metadata=False``, one adapter per objective). None: use the adapters already on ``base.model``
        (a PeftModel), in ``peft_config`` order. ``allow_empty``: {} is an ensemble of no adapter, which decodes
        only the base (weights of length 0, anchored)."""
        from peft import PeftModel

        from emorl.models import check_same_base, eos_ids, load_adapters, read_adapter_info

        self.base = base
        self.infos: dict[str, Any] = {}
        if adapters is not None:
            if not adapters and not allow_empty:
                raise EmorlError("EnsembleModel: no adapters given")
            seen: dict[str, str] = {}
            for name, folder in adapters.items():
                info = read_adapter_info(folder)
                if require_metadata and not (Path(folder) / "emorl.json").exists():
                    raise EmorlError(f"adapter {folder} has no emorl.json (objective and base-model metadata), so "
                                     "emorl cannot check it was trained on this base. Use adapters saved by `emorl "
                                     "train`, or pass require_metadata=False (CLI: --allow-plain-adapters).")
                check_same_base(base, info, folder)
                if info.prompt and {**info.prompt, "form": None} != {**base.prompt_format, "form": None}:
                    log.warning("adapter %s was trained with prompt settings %s, but the base is loaded with %s; "
                                "its replies may differ from training (emorl generate --adapters uses the "
                                "recorded ones)", folder, info.prompt, base.prompt_format)
                if info.objective in seen and require_metadata:
                    raise EmorlError(f"adapters {seen[info.objective]} and {folder} were both trained for objective "
                                     f"{info.objective!r}; give one adapter per objective")
                seen[info.objective] = str(folder)
                self.infos[name] = info
            loaded = set(base.model.peft_config) if isinstance(base.model, PeftModel) else set()
            to_load = {n: f for n, f in adapters.items() if n not in loaded}
            if to_load:
                load_adapters(base, to_load)
            self.names = list(adapters)
        else:
            if not isinstance(base.model, PeftModel):
                raise EmorlError("EnsembleModel: base.model has no adapters attached; pass adapters={name: folder}, "
                                 "or use EnsembleModel.from_run(RUN)")
            self.names = list(base.model.peft_config)
        self.model = base.model
        for n in self.names:
            pc = self.model.peft_config[n]
            if type(pc).__name__ != "LoraConfig":
                raise EmorlError(f"adapter {n!r} is a {type(pc).__name__}; the ensemble needs LoRA adapters")
            if getattr(pc, "use_dora", False) or getattr(pc, "modules_to_save", None):
                raise EmorlError(f"adapter {n!r} uses DoRA or modules_to_save, which cannot be batched per row")
        self.model.eval()
        self.lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.tokenizer = base.tokenizer
        start = getattr(self.lm.config, "decoder_start_token_id", None)
        self.stream = Stream(self.lm, base.is_seq2seq, start if start is not None else self.tokenizer.pad_token_id)
        self.head = Head(self.lm, base.is_seq2seq)
        eos = eos_ids(base)
        self.eos: list[int] = eos
        self.pad: int = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        self._verified = False
        self.preallocate = True  # KV caches as preallocated buffers (no per-step torch.cat of the whole cache)
        self._kv_per_token = 0.0  # KV-cache bytes per row and position, measured by verify_head
        # run the decoder layers below the lowest adapted one once per row group, not once per stream (exact: no
        # adapter acts there); False runs every stream through every layer (the reference the tests compare with)
        self.share_trunk = True

    @classmethod
    def from_run(cls, run_dir: str | Path, names: list[str] | None = None, base: Any | None = None,
                 **kwargs: Any) -> EnsembleModel:
        """Load ``RUN/config.yaml``'s base model (unless ``base`` is given) and the adapters
        ``RUN/adapters/<objective>/`` (all trained objectives, in config order, or ``names``)."""
        from emorl.config import load_config
        from emorl.models import load_base

        run = Path(run_dir)
        if not (run / "config.yaml").exists():
            raise EmorlError(f"{run} is not a run folder: {run / 'config.yaml'} is missing")
        cfg = load_config(run / "config.yaml")
        objectives = names or cfg.trained_objectives()
        folders = {o: run / "adapters" / o for o in objectives}
        missing = [o for o, f in folders.items() if not (f / "adapter_config.json").exists()]
        if missing:
            have = sorted(p.name for p in (run / "adapters").glob("*") if p.is_dir()) if (run / "adapters").exists() \
                else []
            raise EmorlError(f"{run}/adapters has no trained adapter for {missing} (found: {have or 'none'}); run "
                             f"`emorl train` for them first, or pick others with names=[...]")
        return cls(base or load_base(cfg.model), folders, **kwargs)

    @property
    def n_adapters(self) -> int:
        """How many adapters the ensemble mixes: the length of every weight vector."""
        return len(self.names)

    @property
    def device(self) -> torch.device:
        return self.base.device

    def trunk(self, names: list[str]) -> int:
        """How many decoder layers the streams of adapters ``names`` (+ the base slot) share at the bottom: the
        layers below the lowest one any of them adapts (0 when ``share_trunk`` is off)."""
        from emorl.layer_spec import trunk_depth

        return trunk_depth(self.lm, list(names)) if self.share_trunk and len(self.stream.layers) else 0

    # ------------------------------------------------------------------------------------------------ checks

    def verify_head(self) -> None:
        """Check once that head(backbone(x)) reproduces the model's own logits (catches an output transform
        this module does not know, which would make hidden-state mixing wrong)."""
        from emorl.models import adapters_disabled

        if self._verified:
            return
        ids = torch.tensor([[self.pad, self.eos[0] if self.eos else 0, 7]], device=self.device)
        mask = torch.ones_like(ids)
        with torch.inference_mode(), adapters_disabled(self.model):
            h, st = self.stream.prefill(ids, mask)
            self._kv_per_token = cache_bytes_per_row_token(st["cache"], 1)
            if self.base.is_seq2seq:
                start = torch.full((1, 1), self.stream.decoder_start, device=self.device)
                ref = self.lm(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, -1]
            else:
                ref = self.lm(input_ids=ids, attention_mask=mask).logits[:, -1]
            got = self.head(h)
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        if not torch.allclose(got, ref.float(), atol=tol, rtol=1e-3):
            raise EmorlError(f"{type(self.lm).__name__}: emorl's LM-head replica differs from the model's own logits "
                             f"(max diff {(got - ref).abs().max():.3g}); this architecture applies an output "
                             "transform emorl does not know, so hidden-state mixing would be wrong. Please report it.")
        self._verified = True

    # ------------------------------------------------------------------------------------------------ generate

    def generate(self, prompts: list[str], weights: Any, mode: str = "hidden", *, max_new_tokens: int = 64,
                 min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: str | list[str] | None = None,
                 include_stop: bool = False, anchor: str = "base", formatted: bool = False,
                 output_scores: bool | int = False, memory_budget_gb: float | None = None, max_rows: int | None = None,
                 progress: bool = False) -> GenerationResult:
        """Decode ``prompts`` for one weight vector (K) or G weight points (G×K) in one call.

        ``prompts`` are client statements, formatted with the model's chat template and ``model.system_prompt``
        (``formatted=True``: already model input text). All K adapters see the same prefix at every step; a row
        ends at EOS or a ``stop`` string and is padded afterwards; its text is cut before the first stop string
        (OpenAI's semantics, ``emorl serve``) or, with ``include_stop``, after it (vLLM's
        ``include_stop_str_in_output``: the study keeps a sentence's full stop), and ``finish`` says how each row
        ended ("eos", "stop" or "length"). Greedy by default; ``do_sample`` with
        ``temperature``/``top_k``/``top_p`` (transformers' warpers) and ``seed``. ``anchor`` is the weight rule
        (:func:`~emorl.ensemble.mixing.weight_rule`): ``"base"`` mixes each adapter's shift of the base at strength
        w_k (w = 0 decodes the base), ``"none"`` rescales every point to sum 1 (the convex mix; parameter average
        for ``params``). ``output_scores``: the per-step mixed scores before the warpers in
        ``GenerationResult.scores`` (G, B, T, V); an int n keeps those of the first n prompts only ((G, n, T, V)),
        decoding every prompt exactly as without it. Work is chunked so one chunk's
        KV cache fits ``memory_budget_gb`` (default: 4 GiB on CPU, half the free GPU memory) or ``max_rows``."""
        from emorl.data import encode_prompts, format_prompts

        t0 = time.perf_counter()
        stops = _check_args(prompts, mode, max_new_tokens, do_sample, temperature, top_k, top_p, stop)
        rule = weight_rule(mode, anchor)
        w_np, single = check_weights(weights, self.n_adapters, rule == "convex", self.names,
                                     allow_zero=rule == "anchored")
        self.verify_head()

        texts = list(prompts) if formatted else format_prompts(self.tokenizer, list(prompts), self.base.is_seq2seq,
                                                               self.base.config.system_prompt)
        enc = encode_prompts(self.tokenizer, texts, self.base.config.max_prompt_tokens, self.base.is_seq2seq,
                             self.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        n_prompts, n_points = ids.shape[0], w_np.shape[0]
        stop_criteria = None
        if stops:
            from transformers import StopStringCriteria

            stop_criteria = StopStringCriteria(self.tokenizer, stops)
        # adapters with zero weight at every point contribute nothing: leave them out of the batch. The base stream
        # (anchored mixing) runs only if some point's weights do not sum to 1 (where they do, it has weight 0).
        used = [i for i in range(self.n_adapters) if (w_np[:, i] > 0).any()]
        names = [self.names[i] for i in used]
        w_used = torch.tensor(w_np[:, used], dtype=torch.float32, device=self.device)
        anchored = mode != "params" and rule == "anchored" and bool((np.abs(w_np.sum(1) - 1.0) > 0).any())
        if anchored:
            names.append(BASE_SLOT)
        streams = len(names)  # rows per row group: the used adapters, + the base stream when anchored (params: 1 row)
        trunk = self.trunk(names) if mode != "params" and streams > 1 else 0  # one stream: nothing to share
        spec = DecodeSpec(mode, max_new_tokens, min(min_new_tokens, max_new_tokens), do_sample, temperature, top_k,
                          top_p, self.eos, self.pad, stop_criteria, bool(output_scores), anchored)
        score_rows = n_prompts if output_scores is True or not output_scores else min(int(output_scores), n_prompts)
        u_all = None
        if do_sample:  # common random numbers: every point draws the same uniforms (paired comparisons)
            u_all = uniforms(0 if seed is None else int(seed), n_prompts, max_new_tokens, self.device).expand(
                n_points, -1, -1)

        tok_out = torch.full((n_points, n_prompts, max_new_tokens), self.pad, dtype=torch.long, device=self.device)
        len_out = torch.zeros((n_points, n_prompts), dtype=torch.long, device=self.device)
        scores_out: torch.Tensor | None = None
        budget = memory_budget_gb * 2**30 if memory_budget_gb else default_budget(self.device)
        rows = derive_chunking(budget, self._kv_per_token, ids.shape[1] + max_new_tokens,
                               self.head.lm_head.weight.shape[0], max(streams, 1), mode, max_rows)
        plan = self._plan(n_prompts, n_points, streams, rows, mode)
        capacity = (1 if self.base.is_seq2seq else ids.shape[1]) + max_new_tokens  # self-attention cache length
        pbar = None
        if progress:
            from emorl.progress import progress_bar

            pbar = progress_bar(len(plan) * max_new_tokens, f"emorl generate ({mode})", unit="step")
        stats: dict[str, Any] = {"chunks": len(plan), "rows_per_chunk": 0, "trunk_layers": trunk}
        with torch.inference_mode(), cpu_row_padding(self.stream.layers), \
                lora_bank(self.model, names, w_used[:1] if mode == "params" else None) as bank:
            prefill: tuple[torch.Tensor, Any, Any] | None = None
            for g_idx, b_idx in plan:
                w_pairs = w_used[g_idx]
                cap = capacity if self.preallocate else None
                if mode == "params":  # weights differ per row: no prefill is shared across points
                    bank.set_weights(w_pairs)
                    h0, state = self.stream.prefill(ids[b_idx], mask[b_idx])
                    group0 = torch.arange(len(b_idx), device=self.device)
                    if cap is not None:
                        state = Stream.select(state, group0, cap)
                else:  # prefill every stream x this prompt block once; every chunk of points starts from a copy
                    block = torch.unique(b_idx)
                    if prefill is None or not torch.equal(prefill[0], block):
                        prefill = None  # free the previous block's cache first
                        h_blk, st_blk = self.stream.prefill(ids[block], mask[block], streams, trunk)
                        prefill = (block, h_blk, st_blk)
                    _, h0, st_blk = prefill
                    state = Stream.select(st_blk, torch.arange(len(block), device=self.device), cap)
                    group0 = torch.searchsorted(block, b_idx)  # pairs of one prompt share rows until they diverge
                width = 1 if mode == "params" else streams  # backbone rows per pair
                stats["rows_per_chunk"] = max(stats["rows_per_chunk"], len(g_idx) * width)
                u = None if u_all is None else u_all[g_idx, b_idx]
                keep = torch.nonzero(b_idx < score_rows)[:, 0] if output_scores else None
                chunk_spec = spec if keep is None or len(keep) else replace(spec, output_scores=False)
                toks, lens, scs = decode_chunk(self.stream, self.head, bank, chunk_spec, h0, state, group0, w_pairs,
                                               streams, u, pbar, stats, keep)
                del state, h0
                tok_out[g_idx, b_idx] = toks
                len_out[g_idx, b_idx] = lens
                if scs is not None:
                    if scores_out is None:
                        scores_out = torch.zeros(n_points, score_rows, max_new_tokens, scs.shape[-1])
                    scores_out[g_idx[keep].cpu(), b_idx[keep].cpu()] = scs.cpu()
        if pbar is not None:
            pbar.close()
        all_texts = [[reply_text(self.tokenizer, tok_out[g, b, : len_out[g, b]], stops, include_stop)
                      for b in range(n_prompts)] for g in range(n_points)]
        finish = finish_reasons(tok_out, len_out, self.eos, stop_criteria)
        stats["seconds"] = time.perf_counter() - t0
        stats["anchored"] = anchored
        return GenerationResult(list(prompts), list(self.names), mode, w_np, all_texts, tok_out.cpu(), len_out.cpu(),
                                single, scores_out, stats, anchor if rule == "anchored" else "none", finish)

    def _plan(self, n_prompts: int, n_points: int, streams: int, rows: int, mode: str
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks of (point, prompt) pairs, each within ``rows`` backbone rows (``streams`` rows per pair in the
        mixing modes). Mixing modes: prompt blocks (each prefilled once) x groups of whole points; params: consecutive
        pairs, point-major."""
        dev = self.device
        if mode == "params":
            g_all = torch.arange(n_points, device=dev).repeat_interleave(n_prompts)
            b_all = torch.arange(n_prompts, device=dev).repeat(n_points)
            return [(g_all[i:i + rows], b_all[i:i + rows]) for i in range(0, len(g_all), rows)]
        block = min(n_prompts, max(1, rows // streams))
        pts = max(1, rows // (streams * block))
        plan = []
        for b0 in range(0, n_prompts, block):
            b_sel = torch.arange(b0, min(b0 + block, n_prompts), device=dev)
            for g0 in range(0, n_points, pts):
                g_sel = torch.arange(g0, min(g0 + pts, n_points), device=dev)
                plan.append((g_sel.repeat_interleave(len(b_sel)), b_sel.repeat(len(g_sel))))
        return plan

    def _text(self, ids: torch.Tensor, stops: list[str]) -> str:
        """A reply cut before its first stop string (``emorl serve``'s, OpenAI's semantics)."""
        return reply_text(self.tokenizer, ids, stops)


def reply_text(tokenizer: Any, ids: torch.Tensor, stops: list[str], include_stop: bool = False) -> str:
    """A row's reply: its tokens decoded, cut at the first stop string (before it, or after it with
    ``include_stop``: the stopping token may carry more text, e.g. '."', which is dropped), stripped."""
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    hits = [(i, i + len(s)) for s in stops if (i := text.find(s)) >= 0]
    if hits:
        start, end = min(hits)
        text = text[:end] if include_stop else text[:start]
    return text.strip()


def finish_reasons(tokens: torch.Tensor, lengths: torch.Tensor, eos: list[int], stop_criteria: Any = None
                   ) -> list[list[str]]:
    """How each row of ``tokens`` (G, B, T) with ``lengths`` (G, B) ended: "eos" (its last token is an EOS id),
    "stop" (a stop string ends at its last token: what ended the decode) or "length" (cut at T)."""
    g_n, b_n = lengths.shape
    flat = tokens.reshape(g_n * b_n, -1)
    n = lengths.reshape(-1).clamp(min=1)
    last = flat.gather(1, (n - 1)[:, None])[:, 0]
    is_eos = torch.isin(last, torch.tensor(eos, dtype=torch.long, device=flat.device)).tolist()
    is_stop = [False] * len(n)
    if stop_criteria is not None:
        for i, ln in enumerate(n.tolist()):
            is_stop[i] = not is_eos[i] and bool(stop_criteria(flat[i: i + 1, :ln], None)[0])
    reasons = ["eos" if e else "stop" if s else "length" for e, s in zip(is_eos, is_stop, strict=True)]
    return [reasons[g * b_n:(g + 1) * b_n] for g in range(g_n)]


def _check_args(prompts: Any, mode: str, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
                top_p: float, stop: str | list[str] | None) -> list[str]:
    """Refuse bad generate() arguments before any work; returns the stop strings as a list."""
    if mode not in MODES:
        raise EmorlError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    if isinstance(prompts, str) or not prompts:
        raise EmorlError("prompts: give a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise EmorlError(f"prompts[{i}] is empty or not a string: {p!r}")
    if max_new_tokens < 1:
        raise EmorlError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample:
        if not temperature > 0:
            raise EmorlError(f"temperature must be > 0, got {temperature} (use greedy decoding instead of 0)")
        if top_k < 0 or not 0 < top_p <= 1:
            raise EmorlError(f"top_k must be >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise EmorlError("stop: stop strings must be non-empty")
    return stops
