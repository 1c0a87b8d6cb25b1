"""The config schema: one dataclass per stage, each field with its default and help text (``emorl config --keys``).

:meth:`RunConfig.from_dict` checks a dict like a YAML file (:mod:`emorl.config.coerce`, then
:func:`~emorl.config.validate.validate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from emorl.config.coerce import _from_dict
from emorl.config.validate import validate
from emorl.utils import atomic_write_text


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors TRL's `metadata={"help": ...}`
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _greedy(help: str) -> Any:  # noqa: A002 - as _f
    """A greedy GenerationConfig field: the search and the evaluation decode alike unless told otherwise."""
    return field(default_factory=lambda: GenerationConfig(do_sample=False), metadata={"help": help})


@dataclass
class ModelConfig:
    """The frozen base model shared by every adapter."""

    name: str = _f("smollm2-135m-instruct", "Built-in name ('smollm2-135m-instruct' — packaged, offline; "
                   "'tiny-llama' — random tiny model for tests), a Hugging Face hub id, or a local path.")
    kind: Literal["auto", "causal", "seq2seq"] = _f("auto", "Model family; 'auto' reads it from the config.")
    device: str = _f("auto", "'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "float32", "Weights dtype. 'auto' = bfloat16 on a GPU that supports it and on a CPU with AVX512-BF16 but "
        "no AMX (about 4x float32's matmul throughput, and replies stayed batch-invariant on the VM measured; "
        "bench/batch_invariance.py checks a machine), else float32. On an AMX CPU bfloat16 decodes 1.7x faster "
        "(the whole default study is no faster), but a reply changes with its batch (oneDNN's AMX kernels round "
        "by row count): set 'bfloat16' there to trade that for decoding speed. The LoRA parameters and their "
        "optimizer stay float32 either way.")
    cache_dir: str | None = _f(None, "Where converted models are cached (default $EMORL_CACHE or ~/.cache/emorl).")
    system_prompt: str | None = _f(
        "You are a warm, supportive listener. Reply to the person in one or two sentences.",
        "System message for chat-template models; null keeps the tokenizer's own default.")
    max_prompt_tokens: int = _f(128, "Longest prompt in tokens: a longer client statement loses its end (the chat "
                                    "template, system prompt and generation prompt are kept; warned once).")
    tiny_layers: int = _f(2, "'tiny-llama' only: number of layers.")
    tiny_hidden: int = _f(64, "'tiny-llama' only: hidden size.")
    seed: int = _f(0, "'tiny-llama' only: seed of the random initialisation (so every process builds the same base).")


@dataclass
class LoraConfig:
    """LoRA adapters (one per objective for EMORL; one for a baseline)."""

    r: int = _f(8, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = _f(0.05, "Dropout on the LoRA input during training (off while sampling).")
    target_modules: list[str] | str = _f("all-linear", "Module names to adapt, or 'all-linear' (every linear "
                                         "layer except the LM head, as in the paper).")
    layers: list[int] | str = _f("all", "Decoder layers that carry the adapters: 'all', 'top:N' (the top N), "
                                  "'top:P/Q' (the top fraction, e.g. top:1/3) or a list of indices (0 = next to the "
                                  "embeddings; seq2seq: decoder blocks, no encoder adapter). The ensemble runs the "
                                  "layers below the lowest adapted one once for all adapters, and training stops its "
                                  "backward pass there.")
    full_finetune: bool = _f(False, "Baselines only: train all weights instead of a LoRA adapter.")


@dataclass
class DataConfig:
    """Where prompts come from and how they are split."""

    source: Literal["default", "pair", "psych8k", "csv", "jsonl", "hf"] = _f(
        "default", "Built-in emotional-support prompts, a PAIR CSV, a Psych8k JSON, a generic CSV/JSONL, or a "
                   "Hugging Face dataset (saved to disk, or by name with a network).")
    path: str | None = _f(None, "File or folder (or hub name for 'hf').")
    prompt_field: str = _f("prompt", "csv/jsonl/hf: the column holding the client statement.")
    reference_field: str | None = _f(None, "csv/jsonl/hf: optional column with a reference reply.")
    hf_split: str = _f("train", "hf: which split of the dataset to read.")
    split: list[float] = _f([0.5, 0.2, 0.3], "Train / validation / test fractions. 50/20/30 gives the built-in "
                            "data (332 prompts) 166 / 66 / 100: a test split large enough for paired CIs and a "
                            "validation split the weight search cannot overfit as easily (the paper: 80/10/10).")
    shuffle: bool = _f(True, "Shuffle before splitting (the reference splits in file order; set false for that).")
    seed: int = _f(0, "Seed of the shuffle (and of PAIR's reference choice).")
    max_prompts: int | None = _f(None, "Use at most this many prompts in total (after shuffling).")


@dataclass
class GenerationConfig:
    """How replies are sampled (training rollouts, validation) or decoded (evaluation). A reply ends at EOS, at a
    ``stop`` string (kept in the reply) or at ``max_new_tokens``; the report counts each (docs/run.md, "Ended %")."""

    max_new_tokens: int = _f(64, "Maximum reply length in tokens.")
    do_sample: bool = _f(True, "Sample (true) or greedy (false).")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_k: int = _f(50, "Top-k filter (0 = off). 50 is the paper's (implicit HF default).")
    top_p: float = _f(1.0, "Nucleus filter (1.0 = off).")
    min_new_tokens: int = _f(0, "Suppress EOS for this many tokens (benchmarks use it to fix the work).")
    stop: list[str] = _f([], "Stop strings: a reply ends at the first one it generates, which is kept in the reply "
                         "(e.g. [\".\", \"!\", \"?\"] ends it at its first sentence end, as the default preset). "
                         "Used alike by training rollouts, validation, the search and the evaluation. The price: it "
                         "is matched in the decoded text, so \"Mr.\" or \"3.5\" ends a reply early. [] = EOS or "
                         "max_new_tokens only.")


@dataclass
class TrainConfig:
    """RL fine-tuning (k-SCST) of one adapter per objective, or of one baseline policy."""

    strategy: Literal["single", "uniform", "fixed", "dynaopt", "gdpo"] = _f(
        "single", "single = EMORL (one adapter per objective); uniform = one policy on the mean of the log "
                  "rewards; fixed = one policy on user weights (fixed_weights); dynaopt = Exp3 bandit weights; "
                  "gdpo = one policy on the sum of per-reward group-normalised advantages (GDPO).")
    objectives: list[str] | None = _f(None, "Objectives to train (default: all in `objectives`).")
    batch_size: int = _f(16, "Prompts per optimiser step.")
    k: int = _f(3, "Replies sampled per prompt; the baseline of each reply is the mean reward of the k.")
    micro_batch_size: int = _f(6, "Rows (prompt+reply) per forward/backward chunk; bounds peak memory (6 measured "
                               "both faster and ~40% lower peak than 12 on SmolLM2; bench/RESULTS.md).")
    joint_update: bool = _f(False, "strategy=single, causal models, kl_coef=0: the K adapters' updates share one "
                            "forward/backward (LoRA bank, each adapter with its own LoRA dropout; the same "
                            "gradients as K separate updates, exactly so with lora.dropout=0).")
    lr: float = _f(1e-4, "AdamW learning rate.")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    max_grad_norm: float = _f(2.0, "Gradient clipping (L2 norm).")
    autocast: bool = _f(True, "On CUDA, run the update's forward/backward under bfloat16 autocast (fp32 weights and "
                        "optimizer). Ignored on CPU.")
    reward_transform: Literal["log", "identity"] = _f(
        "log", "log: R = ln(clip(score, clip_min, clip_max)) as in the paper; identity: R = score.")
    clip_min: float = _f(1e-4, "Lower clip of a score before the log.")
    clip_max: float = _f(0.9999, "Upper clip of a score before the log.")
    kl_coef: float = _f(0.0, "Per-token KL penalty to the base model (adapter disabled), with gradient. "
                        "0 reproduces the reference, whose KL term is a no-op (see docs).")
    fixed_weights: list[float] | None = _f(None, "strategy=fixed: one weight per objective.")
    dynaopt_gamma: float = _f(0.07, "strategy=dynaopt: Exp3 exploration rate.")
    dynaopt_history: int = _f(8, "strategy=dynaopt: validation rounds kept as history for the bandit reward.")
    max_steps: int = _f(200, "Step budget per adapter.")
    max_prompts: int | None = _f(None, "Budget in prompts consumed per adapter (null = no limit).")
    val_every: int = _f(8, "Validate every this many steps (and at step 0 and the last step). A curve only: set it to "
                        "max_steps to validate at the start and the end, and spend the time on training.")
    dynaopt_val_every: int | None = _f(None, "strategy=dynaopt: its round length in steps (its weights follow each "
                                       "round's validation); null = val_every.")
    val_prompts: int = _f(32, "Size of the fixed validation subset.")
    val_samples: int = _f(1, "Replies sampled per validation prompt (the paper: 3).")
    val_greedy: bool = _f(False, "Validate with greedy decoding instead of sampling. Sampled validation (the paper's) "
                          "uses the same seed at every validation (common random numbers), so the curve moves with "
                          "the policy rather than with sampling noise; greedy hides gains that only sharpen the "
                          "sampling distribution.")
    convergence_window: int = _f(20, "Convergence: window of validation means.")
    convergence_threshold: float = _f(0.015, "Convergence: stop when std/mean of the window is below this (0 = off).")
    checkpoint_every: int = _f(8, "Write a checkpoint every this many steps.")
    seed: int = _f(0, "Seed for sampling and initialisation.")
    log_every: int = _f(1, "Log metrics every this many steps.")
    report_to: list[str] = _f([], "Extra loggers: 'tensorboard', 'wandb'.")
    generation: GenerationConfig = field(default_factory=GenerationConfig,
                                         metadata={"help": "Sampling settings of rollouts and validation."})


@dataclass
class SearchConfig:
    """Weight search over the K adapters' mixing weights."""

    method: Literal["hierarchical", "grid", "random"] = _f("hierarchical", "Search algorithm.")
    modes: list[str] = _f(["hidden", "hidden-convex", "params", "params-convex"],
                          "Mixes searched by `emorl run`: a mode (hidden, logits, probs, params; weight rule "
                          "`search.anchor`), or MODE-convex for the convex form (each point "
                          "rescaled to sum 1: the paper's hidden mix, the parameter average for params).")
    anchor: Literal["base", "none"] = _f("base", "Weight rule of the modes named without a suffix. base: each "
                                         "adapter's shift of the base model at strength w_k (h0 + sum w_k (h_k - "
                                         "h0); W0 + sum w_k dW_k for params); none: convex (sum w = 1).")
    w_max: float = _f(1.0, "Anchored mixes search the box [0, w_max]^K (convex mixes search directions in [0, 1]^K).")
    iterations: int = _f(5, "Hierarchical rounds (final resolution 2^-iterations per axis).")
    grid_points: int = _f(9, "method=grid: points per axis.")
    random_points: int = _f(64, "method=random: number of points.")
    prompts: int | None = _f(None, "Validation prompts decoded per weight point (the same for every point); null = "
                             "the whole validation split.")
    seeds: list[int] = _f([0], "Decoding seeds per point under sampling (a prompt's score is its mean over them, the "
                          "same seeds for every point); greedy decoding uses the first only.")
    reeval_top: int = _f(3, "Re-score the search's top-n points (distinct directions) on reeval_prompts x "
                         "reeval_seeds and choose the best by that (0 = off): a fresh draw of the decoding noise "
                         "removes the winner's curse of picking the luckiest point.")
    reeval_prompts: int | None = _f(None, "Validation prompts of the re-evaluation (null = the whole split).")
    reeval_seeds: list[int] = _f([1000, 1001, 1002], "Decoding seeds of the re-evaluation under sampling (fresh seeds, "
                                 "not the search's, so the re-score is independent of the noise that chose the "
                                 "points); greedy decoding uses the first only.")
    objective_weights: list[float] | None = _f(None, "Aggregate = weighted mean of objective scores (default: mean).")
    batch_points: int = _f(8, "Weight points decoded together in one batch.")
    seed: int = _f(0, "Seed of the random search (decoding seeds: search.seeds).")
    generation: GenerationConfig = _greedy(
        "Decoding settings of the search (greedy by default, as the paper). Keep them equal to eval.generation: a "
        "search that decodes otherwise than the evaluation scores other replies (a mismatch is warned about).")


@dataclass
class EvalConfig:
    """Final comparison of all methods on the test split."""

    split: Literal["train", "validation", "test"] = _f("test", "Which split to evaluate on.")
    prompts: int | None = _f(64, "Evaluate on at most this many prompts (null = all).")
    seeds: list[int] = _f([0], "Decoding seeds; results are mean ± std over seeds.")
    methods: list[str] = _f(["base", "emorl", "emorl-convex", "uniform", "dynaopt", "soups", "soups-avg"],
                            "Methods compared. Logit mixing ('logits') equals hidden mixing under a linear LM head "
                            "(SmolLM2, T5), so it is not in the default list.")
    generation: GenerationConfig = _greedy(
        "Decoding settings, identical for every method. Greedy evaluation (the paper's way for EMORL) is the one "
        "switch eval.generation.do_sample=false, applied to every method alike (base, baselines, mixes, adapters "
        "alone); it decodes once, whatever eval.seeds says.")
    judges: dict[str, dict[str, Any]] = _f({}, "Held-out judges: name -> reward spec (any reward type, e.g. "
                                           "{type: llm-judge, base_url: ..., model: ...}), scored on every method's "
                                           "replies and never used by training, the search or the router; reported "
                                           "beside the objectives with paired differences (docs/rewards.md).")
    kl: bool = _f(False, "Estimate each method's per-token KL to the base model on its test replies (one more decode "
                  "per method and seed, with the evaluation's seeds; emorl.kl).")
    kl_prompts: int | None = _f(None, "Estimate the KL on the first this many prompts of each seed (the same replies: "
                                      "the seeds' random numbers are drawn row by row); null = all.")
    greedy_diversity: bool = _f(False, "Also decode every method greedily once, to report Diversity-2 (both forms) "
                                "under sampled and greedy decoding (emorl.diversity).")
    extra_sets: dict[str, dict[str, Any]] = _f({}, "Further prompt sets: name -> {path: FILE (JSONL or CSV), "
                                               "prompts: N} or {source: chitchat-heldout}; every method is evaluated "
                                               "on each with the same decoding and paired statistics, reported apart "
                                               "from the split (docs/rewards.md).")


@dataclass
class FrontConfig:
    """The steerability study: every mixing mode's empirical Pareto front on the evaluation's prompts."""

    enabled: bool = _f(False, "Run the front stage in `emorl run` (after the evaluation; `emorl front --run RUN` "
                       "runs it alone).")
    modes: list[str] = _f(["hidden", "hidden-convex", "params", "params-convex"],
                          "Mixes whose fronts are drawn, named as in search.modes (MODE follows search.anchor, "
                          "MODE-convex is the sum-1 form).")
    step: float = _f(0.25, "Lattice step per weight axis: the points {0, step, ..., w_max}^K (minus 0), plus each "
                     "mode's searched point.")
    w_max: float = _f(1.0, "Upper end of every weight axis of the lattice.")
    batch_points: int = _f(16, "Weight points decoded together in one batched call.")
    resamples: int = _f(500, "Bootstrap resamples of each front's hypervolume CI.")
    prompts: int | None = _f(None, "Decode the first this many of the evaluation's prompts (null = all of them); "
                             "the units stay paired with the evaluation's.")
    seeds: list[int] | None = _f(None, "Decode these of the evaluation's seeds (null = all of them).")
    linear: bool = _f(True, "Compare every lattice point with the linear prediction from the adapters alone (needs "
                      "`singles` among eval.methods).")
    sweep: list[str] = _f([], "Two objectives whose adapters are swept (t, 1 - t), t = 0, 0.1, ..., 1, to see "
                          "whether a pool dips below both ends (empty = no sweep).")
    sweep_modes: list[str] = _f(["hidden", "probs"], "Pools of the sweep: hidden (log-linear: mixed hidden states, "
                                "i.e. logits) and probs (linear: mixed next-token distributions).")


@dataclass
class RouteConfig:
    """Per-prompt mixing weights (``emorl route``, ``--weights auto``): a router fitted on lattice scores of
    training prompts. See docs/router.md."""

    enabled: bool = _f(False, "Fit the router as a stage of `emorl run` (after the search).")
    split: Literal["train", "validation"] = _f("train", "Prompts the router's data is decoded on (never the test "
                                                        "split).")
    prompts: int | None = _f(32, "Use at most this many prompts of that split (null = all).")
    step: float = _f(0.5, "Lattice step per weight axis, as a fraction of search.w_max (1/step must be an integer): "
                          "the base-anchored points {0, step, ..., 1}^K · w_max.")
    seeds: list[int] = _f([0], "Decoding seeds of the router's data (eval.generation's settings).")
    use_search: bool = _f(True, "Add the search's best point to the lattice, and the search log's per-prompt rows "
                                "to the data where they exist.")
    method: Literal["auto", "knn", "ridge"] = _f(
        "auto", "knn: mean best weights of the k nearest neighbours (the most similar training prompts); ridge: "
                "ridge regression of every lattice point's score, argmax; auto: the one with the higher "
                "cross-validated reward.")
    k: int = _f(5, "knn: number of nearest neighbours (training prompts) whose best weights are averaged.")
    ridge_alpha: float = _f(1.0, "ridge: L2 penalty.")
    folds: int = _f(5, "Cross-validation folds over the training prompts (method=auto, and the reported fit).")
    fallback_percentile: float = _f(95.0, "A prompt whose nearest training prompt is farther (cosine distance) than "
                                          "this percentile of the training prompts' own nearest-neighbour "
                                          "distances gets the global weights.")
    seed: int = _f(0, "Seed of the cross-validation folds.")


@dataclass
class ExecutorConfig:
    """Where the pipeline's work runs. Never changes a result: the same seeds give the same adapters and scores."""

    kind: Literal["local", "ray"] = _f("local", "local: in this process; ray: tasks/actors on a Ray cluster.")
    address: str | None = _f(None, "Ray cluster address (auto, HOST:PORT, ray://...); null starts a local Ray "
                                   "instance for the run and shuts it down after.")
    num_cpus: float = _f(1.0, "CPUs requested by each Ray training task and search/evaluation worker.")
    num_gpus: float = _f(0.0, "GPUs requested by each Ray task/worker; fractions share a GPU (0.33 = three per GPU).")
    workers: int | None = _f(None, "Search/evaluation workers (actors), each loading the model once; null = as "
                                   "many as the cluster's CPUs (or GPUs) allow, at most 8.")
    max_retries: int = _f(3, "Times Ray reruns a training task whose worker died (it resumes from its last "
                             "checkpoint).")


@dataclass
class RunConfig:
    """A whole study: model, adapters, data, objectives (rewards), training, search, evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Prompt data."})
    objectives: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"reflection": {"type": "reflection"}, "empathy": {"type": "empathy"},
                                 "fluency": {"type": "fluency"}},
        metadata={"help": "Objective name -> reward spec ({'type': ..., options}); see emorl.rewards."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "RL training."})
    search: SearchConfig = field(default_factory=SearchConfig, metadata={"help": "Weight search."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})
    front: FrontConfig = field(default_factory=FrontConfig, metadata={"help": "Pareto fronts of the mixing modes."})
    route: RouteConfig = field(default_factory=RouteConfig, metadata={"help": "Per-prompt weights (router)."})
    executor: ExecutorConfig = field(default_factory=ExecutorConfig,
                                     metadata={"help": "Where the work runs (local process or Ray)."})
    output: str | None = _f(None, "Run folder (default runs/<preset>).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The inverse of :meth:`to_dict` (checked like a YAML file): how a config travels to remote workers."""
        cfg = _from_dict(cls, data)
        validate(cfg)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())

    def trained_objectives(self) -> list[str]:
        return list(self.train.objectives) if self.train.objectives else list(self.objectives)
