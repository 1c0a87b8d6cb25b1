"""``emorl generate``: decode prompts with the K adapters mixed by weights (one or several weight points).

    emorl generate --run runs/default --weights 0.8,0.5,0.1 --prompt "I lost my job today."
    emorl generate --run runs/default --method emorl --seed 0 --prompt "I lost my job today."
    emorl generate --adapters A/ B/ C/ --weights 1,0,0 --weights 0.5,0.5,0.5 --input prompts.jsonl \\
        --mode logits --temperature 0.7 --top-p 0.9 --seed 0 --score --output replies.jsonl

Weights follow one rule (--anchor): base (default) mixes each adapter's shift of the base model at strength w_k,
h = h0 + sum w_k (h_k - h0), so 0,0,0 is the base model and 1,0,0 the first adapter; none rescales each point to
sum 1 (the paper's convex mix; the parameter average for --mode params). --method decodes a method of the run
exactly as the evaluation did: its stored weights, mode and anchor, and the run's eval.generation settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from emorl.utils import EmorlError, atomic_write_text

log = logging.getLogger("emorl.generate")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="decode prompts with adapters mixed by weights (EMORL ensemble)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder: RUN/config.yaml gives the base model, RUN/adapters/* the adapters")
    src.add_argument("--adapters", nargs="+", metavar="DIR", help="adapter folders (peft format + emorl.json)")
    p.add_argument("--names", help="--run: comma-separated objectives to mix, in weight order (default: all trained)")
    p.add_argument("--model", help="--adapters: base model (default: the one named in the adapters' emorl.json)")
    how = p.add_mutually_exclusive_group(required=True)
    # "-1,0,0" is a weight vector, not an option: argparse takes only a plain negative number (-1, -.5) as a value
    # by itself, so the weights' form is added (check_weights then says what is wrong with a negative weight)
    p._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.eE+-]*,[\d.,eE+-]*$")
    how.add_argument("--weights", action="append", metavar="W1,W2,...",
                     help="one weight per adapter, in order; repeat for several weight points (decoded in one batch); "
                          "'auto' (with --run): per-prompt weights from the run's router (`emorl route`)")
    how.add_argument("--method", help="--run: decode a method of the run as evaluated (emorl, soups, uniform, base, "
                                      "single:<objective>, ...), with the run's eval.generation settings")
    p.add_argument("--anchor", choices=["base", "none"], default="base",
                   help="weight rule: base = h0 + sum w_k (h_k - h0) (default); none = each point rescaled to sum 1")
    p.add_argument("--mode", choices=["hidden", "logits", "probs", "params"], default="hidden",
                   help="hidden = EMORL hidden-state mixing (default); logits = sum w log p (MOD); probs = log sum "
                        "w p; params = merged weights W0 + sum w dW (model soups)")
    inp = p.add_mutually_exclusive_group(required=True)
    inp.add_argument("--prompt", action="append", metavar="TEXT", help="a client statement (repeatable)")
    inp.add_argument("--input", metavar="FILE.jsonl", help="JSONL file, one object per line with a prompt field")
    p.add_argument("--prompt-field", default="prompt", help="--input: the field holding the statement")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default unless a sampling option "
                                                         "is given)")
    p.add_argument("--temperature", type=float, help="sample with this temperature")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the nucleus of probability p")
    p.add_argument("--max-new-tokens", type=int, help="default 64 (--method: eval.generation's)")
    p.add_argument("--min-new-tokens", type=int, help="default 0 (--method: eval.generation's)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string, kept in the reply (repeatable; default none, --method: eval.generation's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--score", action="store_true", help="add every objective's reward for each reply")
    p.add_argument("--output", metavar="FILE.jsonl", help="write JSONL here (default: print JSONL to stdout)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the config's)")
    p.add_argument("--allow-plain-adapters", action="store_true",
                   help="accept adapters without emorl.json (no base-model check)")
    p.set_defaults(func=run)


def parse_weights(items: list[str]) -> list[list[float]]:
    out = []
    for i, s in enumerate(items):
        try:
            out.append([float(x) for x in s.split(",") if x.strip()])
        except ValueError as e:
            raise EmorlError(f"--weights #{i + 1} {s!r}: expected comma-separated numbers, e.g. 0.8,0.5,0.1") from e
    return out


def read_prompts(path: str, field: str) -> list[str]:
    """Prompts from a JSONL file; a bad line is an error naming file:line."""
    p = Path(path)
    if not p.exists():
        raise EmorlError(f"--input {p}: no such file")
    prompts = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EmorlError(f"{p}:{i}: not valid JSON ({e})") from e
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise EmorlError(f"{p}:{i}: needs a non-empty string field {field!r} (set --prompt-field)")
        prompts.append(value)
    if not prompts:
        raise EmorlError(f"--input {p}: no prompts in the file")
    return prompts


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Path], dict[str, dict[str, Any]]]:
    """(run config or None, the base model, the adapters to mix (name -> folder), their objectives' reward specs).

    ``--adapters``: the base is loaded with the prompt format the adapters were trained with (emorl.json)."""
    from emorl.config import ModelConfig, load_config
    from emorl.models import load_base, read_adapter_info

    if args.run:
        cfg_path = Path(args.run) / "config.yaml"
        if not cfg_path.exists():
            raise EmorlError(f"--run {args.run}: no config.yaml there (is it a run folder made by `emorl train`?)")
        cfg = load_config(cfg_path)
        if args.device:
            cfg.model.device = args.device
        names = [n.strip() for n in args.names.split(",")] if args.names else cfg.trained_objectives()
        folders = {n: Path(args.run) / "adapters" / n for n in names}
        missing = [n for n, f in folders.items() if not (f / "adapter_config.json").exists()]
        if missing and not args.method:
            raise EmorlError(f"--run {args.run}: no trained adapter for {missing}; run `emorl train` for them first, "
                             f"or pick others with --names")
        return cfg, load_base(cfg.model), folders, {n: cfg.objectives[n] for n in names if n in cfg.objectives}
    if args.method:
        raise EmorlError("--method needs --run (a method is a run's searched weights or baseline)")
    infos = {Path(d): read_adapter_info(d) for d in args.adapters}
    model_names = {i.base.get("name") for i in infos.values() if i.base.get("name")}
    if args.model:
        model = args.model
    elif len(model_names) == 1:
        model = model_names.pop()
    else:
        raise EmorlError(f"--adapters: cannot tell the base model ({sorted(model_names) or 'not recorded'}); "
                         f"pass --model NAME_OR_PATH")
    prompts = [i.prompt for i in infos.values() if i.prompt]
    if any(p != prompts[0] for p in prompts):
        raise EmorlError(f"--adapters were trained with different prompt formats {prompts}; mix adapters trained "
                         f"with the same system prompt and max_prompt_tokens")
    fmt = {k: v for k, v in (prompts[0] if prompts else {}).items() if k in ("system_prompt", "max_prompt_tokens")}
    mcfg = ModelConfig(name=model, **fmt, **({"device": args.device} if args.device else {}))
    adapters: dict[str, Path] = {}
    for d, info in infos.items():
        name = info.objective or d.name
        if name in adapters:
            name = d.name
        adapters[name] = d
    specs: dict[str, dict[str, Any]] = {}
    for info in infos.values():
        specs.update(info.rewards or {})
    return None, load_base(mcfg), adapters, specs


def _generation(args: argparse.Namespace, default: Any) -> Any:
    """``default`` (a GenerationConfig) with the sampling options given on the command line."""
    import dataclasses

    sampling = [v is not None for v in (args.temperature, args.top_k, args.top_p)]
    if args.greedy and any(sampling):
        raise EmorlError("--greedy cannot be combined with --temperature/--top-k/--top-p")
    change: dict[str, Any] = {}
    if args.greedy:
        change["do_sample"] = False
    if any(sampling):
        change.update(do_sample=True, temperature=1.0 if args.temperature is None else args.temperature,
                      top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p)
    for name in ("max_new_tokens", "min_new_tokens"):
        if getattr(args, name) is not None:
            change[name] = getattr(args, name)
    return dataclasses.replace(default, **change)


def run(args: argparse.Namespace) -> int:
    from emorl.config import GenerationConfig
    from emorl.decoding import Decoder

    auto = bool(args.weights) and "auto" in args.weights
    if auto and len(args.weights) > 1:
        raise EmorlError("--weights auto picks one weight vector per prompt; do not combine it with other --weights")
    if auto and (not args.run or args.mode != "hidden"):
        raise EmorlError("--weights auto needs --run RUN (whose router `emorl route` fitted) and --mode hidden")
    prompts = args.prompt if args.prompt else read_prompts(args.input, args.prompt_field)
    weights = parse_weights(args.weights) if args.weights and not auto else None
    cfg, base, adapters, specs = _load(args)
    strict = not args.allow_plain_adapters
    if args.method:
        from emorl.methods import any_adapter, resolve_methods

        (method,) = resolve_methods(args.run, cfg, [args.method])  # clear error if its inputs are missing
        gen = _generation(args, cfg.eval.generation)
        decoder = Decoder(base, gen, any_adapter(Path(args.run), [method]), require_metadata=strict)
    else:
        from emorl.ensemble import check_weights, weight_rule

        gen = _generation(args, GenerationConfig(do_sample=False))
        decoder = Decoder(base, gen, require_metadata=strict)
        ens = decoder.ensemble(adapters)
        if auto:
            from emorl.router import route

            routed, fallback, _ = route(args.run, ens, prompts)  # refused before decoding if fitted on other adapters
        else:
            anchored = weight_rule(args.mode, args.anchor) == "anchored"  # anchored, w = 0 is the base model
            check_weights(weights, ens.n_adapters, names=ens.names, allow_zero=anchored)  # clear error before decoding
    rewards = None
    if args.score:
        if not specs:
            raise EmorlError("--score: no reward specs found (the run config or the adapters' emorl.json should "
                             "list the objectives)")
        from emorl.rewards import build_rewards

        rewards = build_rewards(specs, base)
    # --stop replaces the config's eval.generation.stop; either way the stop string is kept (as in the study)
    kw = {"progress": sys.stderr.isatty(), **({"stop": args.stop} if args.stop else {})}
    if args.method:
        records = decoder.result(method, prompts, args.seed, **kw).records()
    elif auto:
        from emorl.decoding import decode_routed, generation_kwargs

        texts, _, _ = decode_routed(ens, prompts, routed, mode="hidden", seed=args.seed,
                                 **(generation_kwargs(gen) | ({"stop": args.stop} if args.stop else {})))
        records = [{"prompt": p, "weights": dict(zip(ens.names, map(float, w), strict=True)), "mode": "hidden",
                    "router": "fallback" if f else "routed", "reply": t}
                   for p, w, f, t in zip(prompts, routed, fallback, texts, strict=True)]
    else:
        records = decoder.generate(adapters, prompts, weights, args.mode, args.anchor, args.seed, **kw).records()
    if rewards:
        from emorl.rewards import score

        for name, rw in rewards.items():
            values = score(rw, [r["prompt"] for r in records], [r["reply"] for r in records])
            for r, v in zip(records, values, strict=True):
                r.setdefault("scores", {})[name] = round(float(v), 6)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.output:
        atomic_write_text(args.output, text)
        what = (f"method {args.method}" if args.method else "routed weights" if auto
                else f"{len(weights or [])} weight points")
        log.info("%d replies (%s x %d prompts, mode=%s) -> %s", len(records), what, len(prompts),
                 method.mode if args.method else args.mode, args.output)
    else:
        sys.stdout.write(text)
    return 0
