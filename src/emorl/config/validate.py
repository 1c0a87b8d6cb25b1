"""Cross-field checks of a :class:`~emorl.config.schema.RunConfig` that types alone cannot express."""

from __future__ import annotations

from typing import TYPE_CHECKING

from emorl.utils import EmorlError

if TYPE_CHECKING:
    from emorl.config.schema import RunConfig


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    t = cfg.train
    if not cfg.objectives:
        raise EmorlError("objectives: at least one objective is needed")
    for name, spec in cfg.objectives.items():
        if not isinstance(spec, dict) or "type" not in spec:
            raise EmorlError(f"objectives.{name}: a reward spec needs a 'type' (e.g. {{type: empathy}})")
    for o in t.objectives or []:
        if o not in cfg.objectives:
            raise EmorlError(f"train.objectives: {o!r} is not defined in objectives ({', '.join(cfg.objectives)})")
    for name, v, lo in [("train.batch_size", t.batch_size, 1), ("train.k", t.k, 1), ("train.max_steps", t.max_steps, 0),
                        ("train.val_every", t.val_every, 1),
                        ("train.dynaopt_val_every", 1 if t.dynaopt_val_every is None else t.dynaopt_val_every, 1),
                        ("train.checkpoint_every", t.checkpoint_every, 1),
                        ("train.micro_batch_size", t.micro_batch_size, 1), ("train.val_prompts", t.val_prompts, 1),
                        ("lora.r", cfg.lora.r, 1), ("search.iterations", cfg.search.iterations, 1),
                        ("search.prompts", 1 if cfg.search.prompts is None else cfg.search.prompts, 1),
                        ("search.reeval_top", cfg.search.reeval_top, 0),
                        ("search.reeval_prompts", 1 if cfg.search.reeval_prompts is None else cfg.search.reeval_prompts,
                         1),
                        ("train.generation.max_new_tokens", t.generation.max_new_tokens, 1)]:
        if v < lo:
            raise EmorlError(f"{name} must be >= {lo}, got {v}")
    for name, gen in [("train.generation", t.generation), ("search.generation", cfg.search.generation),
                      ("eval.generation", cfg.eval.generation)]:
        check_stop(name, gen.stop)
    from emorl.layer_spec import check_layer_spec

    check_layer_spec(cfg.lora.layers)
    if t.k < 2 and t.strategy in ("single", "uniform", "fixed", "dynaopt", "gdpo"):
        raise EmorlError("train.k must be >= 2: k-SCST's baseline is the mean of the k replies of a prompt")
    if not 0 < t.clip_min < t.clip_max <= 1:
        raise EmorlError("train.clip_min/clip_max must satisfy 0 < clip_min < clip_max <= 1")
    if t.strategy == "fixed":
        n = len(cfg.trained_objectives())
        if not t.fixed_weights or len(t.fixed_weights) != n:
            raise EmorlError(f"train.fixed_weights: strategy 'fixed' needs {n} weights (one per objective), "
                             f"got {t.fixed_weights}")
    split = cfg.data.split
    if len(split) != 3 or any(s < 0 for s in split) or abs(sum(split) - 1) > 1e-6:
        raise EmorlError(f"data.split must be three non-negative fractions summing to 1, got {split}")
    fr = cfg.front
    if not 0 < fr.step <= fr.w_max or fr.w_max / fr.step > 20 or fr.batch_points < 1 or fr.resamples < 1:
        raise EmorlError(f"front: need 0 < step <= w_max with at most 20 steps per axis, batch_points >= 1 and "
                         f"resamples >= 1 (got step={fr.step}, w_max={fr.w_max}, batch_points={fr.batch_points}, "
                         f"resamples={fr.resamples})")
    if fr.prompts is not None and fr.prompts < 1:
        raise EmorlError(f"front.prompts must be >= 1 or null (all of the evaluation's prompts), got {fr.prompts}")
    if fr.seeds is not None and (not fr.seeds or set(fr.seeds) - set(cfg.eval.seeds)):
        raise EmorlError(f"front.seeds must be a non-empty subset of eval.seeds {cfg.eval.seeds} (or null), got "
                         f"{fr.seeds}")
    if fr.sweep:
        trained = cfg.trained_objectives()
        if len(fr.sweep) != 2 or len(set(fr.sweep)) != 2 or set(fr.sweep) - set(trained):
            raise EmorlError(f"front.sweep must name two different objectives with adapters ({', '.join(trained)}), "
                             f"e.g. front.sweep=[{', '.join(trained[:2])}]; got {fr.sweep}")
        bad = [m for m in fr.sweep_modes if m not in ("hidden", "logits", "probs")]
        if bad or not fr.sweep_modes:
            raise EmorlError(f"front.sweep_modes: choose from hidden, logits, probs (got {fr.sweep_modes})")
    if cfg.eval.kl_prompts is not None and cfg.eval.kl_prompts < 1:
        raise EmorlError(f"eval.kl_prompts must be >= 1 or null (all prompts), got {cfg.eval.kl_prompts}")
    for name, spec in cfg.eval.judges.items():
        if not isinstance(spec, dict) or "type" not in spec:
            raise EmorlError(f"eval.judges.{name}: a judge is a reward spec with a 'type' (e.g. {{type: empathy}})")
        if name in cfg.objectives:
            raise EmorlError(f"eval.judges.{name}: a judge may not share its name with an objective; rename it")
    ex = cfg.executor
    if ex.num_cpus < 0 or ex.num_gpus < 0 or ex.max_retries < 0 or (ex.workers is not None and ex.workers < 1):
        raise EmorlError("executor: num_cpus, num_gpus and max_retries must be >= 0 and workers >= 1")
    if cfg.data.source != "default" and not cfg.data.path:
        raise EmorlError(f"data.path is required for data.source={cfg.data.source!r}")


def check_stop(name: str, stop: object) -> None:
    """``<name>.stop`` must be a list of non-empty strings: an empty one would end every reply at once."""
    if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
        raise EmorlError(f"{name}.stop must be a list of non-empty strings (e.g. {name}.stop=['.', '!', '?'], or [] "
                         f"for none), got {stop!r}")
