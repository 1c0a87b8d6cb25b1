"""Render a run's report from what the run folder holds: ``RUN/report.md``, ``RUN/results.json``, ``RUN/figures/``.

Inputs: ``RUN/eval/results.json`` (from :func:`emorl.evaluate.evaluate_run`), the adapters' and baselines'
``emorl.json`` (training cost and validation curves), ``RUN/search/<mode>/`` (weights found, points scored)
and ``RUN/stages.json`` (the pipeline's stage times). Nothing is decoded, so re-rendering takes seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from emorl.evaluate_stats import difference_sentences
from emorl.report import figures as F
from emorl.report.diversity import diversity_markdown, diversity_summary
from emorl.report.ended import with_ended
from emorl.report.extra_sets import extra_sets_markdown, extra_sets_summary
from emorl.report.judges import judges_markdown, judges_summary
from emorl.report.kl import kl_markdown, plot_reward_vs_kl
from emorl.report.tables import (
    comparison_table,
    differences_table,
    front_table,
    improvement_table,
    markdown,
    stages_table,
    training_table,
    weights_table,
)
from emorl.utils import EmorlError, atomic_write_json, atomic_write_text, read_jsonl

log = logging.getLogger("emorl.report")

SEARCH_VIEWS = ("history", "landscape", "tradeoff", "weights")


def collect_policies(run: Path, objectives: list[str]) -> dict[str, dict[str, Any]]:
    """Every trained policy of the run: EMORL adapters (config order first), then the baselines. A policy is found by
    its ``emorl.json`` (written with the weights, atomically), so a stored study without the weights reports too."""
    from emorl.models import read_adapter_info

    def policy(p: Path) -> bool:  # a dot-folder is a half-written or replaced copy (utils.atomic_folder)
        return (p / "emorl.json").exists() and not p.name.startswith(".")

    folders: list[tuple[str, str, Path]] = []
    adir = run / "adapters"
    if adir.exists():
        found = sorted(p.name for p in adir.iterdir() if policy(p))
        for name in [o for o in objectives if o in found] + [n for n in found if n not in objectives]:
            folders.append((f"EMORL: {name}", "emorl", adir / name))
    bdir = run / "baselines"
    if bdir.exists():
        from emorl.methods import LABELS

        order = list(LABELS)
        for p in sorted(bdir.iterdir(), key=lambda p: (order.index(p.name) if p.name in order else 99, p.name)):
            if policy(p):
                folders.append((LABELS.get(p.name, p.name), p.name, p))
    out = {}
    for label, method, folder in folders:
        info = read_adapter_info(folder, require_weights=False)
        curve = info.curve or []
        out[label] = {"method": method, "folder": str(folder), "objectives": info.objectives or [info.objective],
                      "steps": info.steps, "prompts": info.prompts_consumed, "wall_time_s": info.wall_time_s,
                      "converged": info.converged, "stop_reason": info.extra.get("stop_reason", ""),
                      "first_value": curve[0]["value"] if curve else None,
                      "last_value": curve[-1]["value"] if curve else None,
                      "first_scores": curve[0].get("scores") if curve else None,
                      "last_scores": curve[-1].get("scores") if curve else None,
                      "curve": [{"prompts": c["prompts"], "value": c["value"]} for c in curve]}
    return out


def collect_search(run: Path) -> dict[str, dict[str, Any]]:
    """best.json of every mode searched with the hierarchical method, plus the best score after each round."""
    out = {}
    sdir = run / "search"
    if not sdir.exists():
        return out
    order = {m: i for i, m in enumerate(("hidden", "params", "logits", "probs"))}
    for best_path in sorted(sdir.glob("*/best.json"), key=lambda p: (order.get(p.parent.name, 9), p.parent.name)):
        try:
            b = json.loads(best_path.read_text())
        except json.JSONDecodeError as e:
            raise EmorlError(f"{best_path}: corrupt JSON ({e}); re-run `emorl search --mode "
                             f"{best_path.parent.name} --fresh`") from e
        b["history"] = [r["best_aggregate"] for r in b.get("rounds", [])]
        head = read_jsonl(best_path.parent / "points.jsonl")[:1]
        b["generation"] = head[0].get("generation") if head and head[0].get("kind") == "header" else None
        out[best_path.parent.name] = b
    return out


def search_result(folder: Path) -> Any:
    """Rebuild a :class:`~emorl.search.SearchResult` from ``points.jsonl`` + ``best.json`` (for re-plotting)."""
    from emorl.search.evaluator import PointRecord
    from emorl.search.hierarchical import Round, SearchResult

    best = json.loads((folder / "best.json").read_text())
    rows = [r for r in read_jsonl(folder / "points.jsonl") if r.get("kind") != "header"]
    rounds = [Round(r["round"], r["lo"], r["hi"][0] - r["lo"][0], r["kept_offset"], r["best_weights"],
                    r["best_aggregate"]) for r in best.get("rounds", [])]
    return SearchResult(best.get("method", "hierarchical"), best["weight_vector"], best["aggregate"], best["scores"],
                        [PointRecord.from_json(r) for r in rows], rounds)


def _search_views(run: Path, search: dict[str, dict[str, Any]], fig_dir: Path) -> list[Path]:
    """The search's own figures, copied into figures/ (re-plotted from the log when missing)."""
    out = []
    for mode, b in search.items():
        folder = run / "search" / mode
        missing = [v for v in SEARCH_VIEWS if not (folder / f"{v}.png").exists()]
        if missing and (folder / "points.jsonl").exists():
            from emorl.search.plots import plot_all

            plot_all(search_result(folder), b.get("names", []), folder, mode=mode)
        for v in SEARCH_VIEWS:
            src = folder / f"{v}.png"
            if src.exists():
                dst = fig_dir / f"search_{mode}_{v}.png"
                shutil.copyfile(src, dst)
                out.append(dst)
    return out


def _hidden_points(run: Path, objectives: list[str]) -> np.ndarray | None:
    rows = [r for r in read_jsonl(run / "search" / "hidden" / "points.jsonl")
            if r.get("kind") != "header" and r.get("source") != "degenerate" and r.get("scores")]
    pts = [[r["scores"].get(o, np.nan) for o in objectives] for r in rows]
    return np.array(pts, dtype=float) if pts else None


def _decoded_alike(results: dict[str, Any], search: dict[str, dict[str, Any]]) -> bool:
    """Whether the evaluation decoded like the hidden search (both greedy, same length), so that the search's
    validation scores and the methods' test scores can share a plot."""
    if "hidden" not in search:  # no hidden-mixing search: no points to draw
        return False
    g = results.get("generation", {})
    sg = search["hidden"].get("generation")
    if sg is None:
        return not g.get("do_sample", False)
    return not g.get("do_sample") and not sg.get("do_sample") and g.get("max_new_tokens") == sg.get("max_new_tokens")


def _no_overlay(s: dict[str, Any]) -> str:
    """Why the trade-off figure has no search points behind the methods."""
    if "hidden" not in s["search"]:
        return "No hidden-mixing search ran, so no search points are drawn behind the methods."
    return ("The search's own trade-off view (`search_hidden_tradeoff.png`) is not overlaid: the overlay needs the "
            "search and this evaluation both greedy and of the same length; here the search used "
            f"{_how(s['search']['hidden'].get('generation'))} and the evaluation {_how(s['eval'].get('generation'))}.")


def _how(g: dict[str, Any] | None) -> str:
    """'sampling (up to 24 new tokens)' or 'greedy decoding (…)' for a generation dict."""
    if not g:
        return "settings it did not record"
    how = "sampling" if g.get("do_sample") else "greedy decoding"
    return f"{how} (up to {g.get('max_new_tokens', '?')} new tokens)"


def make_figures(run: Path, results: dict[str, Any], policies: dict[str, dict[str, Any]],
                 search: dict[str, dict[str, Any]]) -> list[Path]:
    fig_dir = run / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    objectives = list(results["objectives"])
    K = len(objectives)
    curves = {label: {"method": p["method"], "prompts": [c["prompts"] for c in p["curve"]],
                      "value": [c["value"] for c in p["curve"]], "converged": p["converged"],
                      "what": f"{p['objectives'][0]} score" if len(p["objectives"]) == 1
                      else f"mean of {len(p['objectives'])}"} for label, p in policies.items()}
    methods = results["methods"]
    scatter = [{"method": name, "label": m["label"], "prompts": (m.get("training") or {}).get("prompts", 0),
                "mean": m["summary"]["mean_reward"]["mean"], "std": m["summary"]["mean_reward"]["std"],
                "n": m["summary"]["mean_reward"]["n"], "ci95": m["summary"]["mean_reward"].get("ci95")}
               for name, m in methods.items()]
    trade = [{"method": name, "label": m["label"],
              "mean": {o: m["summary"][f"score/{o}"]["mean"] for o in objectives},
              "std": {o: m["summary"][f"score/{o}"]["std"] for o in objectives},
              "ci95": {o: m["summary"][f"score/{o}"].get("ci95") for o in objectives}} for name, m in methods.items()]
    out = [F.plot_training_curves(curves, fig_dir / "training_curves.png"),
           F.plot_results_scatter(scatter, fig_dir / "results_scatter.png"),
           F.plot_tradeoffs(objectives, trade, fig_dir / "tradeoffs.png", _hidden_points(run, objectives)
                            if K >= 2 and _decoded_alike(results, search) else None),
           F.plot_search_modes({m: b["history"] for m, b in search.items()},
                               {m: b.get("points", 0) for m, b in search.items()}, fig_dir / "search_modes.png")]
    return [p for p in out if p is not None] + _search_views(run, search, fig_dir)


def _used_weights(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    from emorl.methods import MODE_METHOD

    return {mode: results["methods"][m]["weights"] for mode, m in MODE_METHOD.items()
            if results["methods"].get(m, {}).get("weights")}


def _samples(results: dict[str, Any]) -> list[dict[str, Any]]:
    methods = results["methods"]
    first = next(iter(methods.values()), None)
    if not first:
        return []
    out = []
    for i, s in enumerate(first.get("samples", [])):
        replies = {m["label"]: m["samples"][i]["reply"] for m in methods.values()
                   if i < len(m.get("samples", [])) and m["samples"][i]["prompt"] == s["prompt"]}
        out.append({"prompt": s["prompt"], "replies": replies})
    return out


def _decoding(results: dict[str, Any]) -> str:
    g = results["generation"]
    how = (f"sampled (T={g['temperature']}, top-k {g['top_k'] or 'off'}, top-p {g['top_p']})" if g["do_sample"]
           else "greedy")
    seeds = results["seeds"]
    if g["do_sample"]:
        seed_txt = (f"{len(seeds)} seed{'s' * (len(seeds) != 1)} ({', '.join(map(str, seeds))}); each cell: mean "
                    "[95% CI, paired bootstrap over prompts]")
    else:
        seed_txt = "one decode (greedy decoding does not depend on the seed, so there is no spread to report)"
    stop = g.get("stop") or []
    stop_txt = f", ending at the first stop string ({' '.join(f'`{x}`' for x in stop)}, kept in the reply)" if stop \
        else ""
    return f"{how}, up to {g['max_new_tokens']} new tokens{stop_txt}, {seed_txt}"


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN/report.md``, ``RUN/results.json`` and ``RUN/figures/``; returns the report's path."""
    run = Path(run_dir)
    from emorl.evaluate import load_results

    results = load_results(run)
    if not results or not results.get("methods"):
        raise EmorlError(f"{run / 'eval' / 'results.json'} is missing or empty: evaluate the run first "
                         f"(`emorl evaluate --run {run}`, or `emorl run --output {run} --resume`)")
    objectives = list(results["objectives"])
    policies = collect_policies(run, objectives)
    search = collect_search(run)
    stage_data = json.loads((run / "stages.json").read_text()) if (run / "stages.json").exists() else {}
    stages = stage_data.get("stages", {})
    figs = make_figures(run, results, policies, search)
    figs += [p for p in [plot_reward_vs_kl(results, run / "figures" / "reward_vs_kl.png")] if p is not None]
    tables = {"comparison": with_ended(run, results, comparison_table(results)),
              "training": training_table(policies),
              "weights": weights_table(search, _used_weights(results)), "stages": stages_table(stages)}
    improved = improvement_table(results)
    if improved:
        tables["improvement"] = improved
    diffs = differences_table(results)
    if diffs:
        tables["differences"] = diffs
    front = json.loads((run / "front" / "front.json").read_text()) if (run / "front" / "front.json").exists() else None
    if front and front.get("modes"):
        tables["front"] = front_table(front)
    samples = _samples(results)
    summary = {
        "version": 1, "run": str(run), "rendered": time.strftime("%Y-%m-%d %H:%M:%S"), "model": results.get("model"),
        "objectives": objectives, "eval": {k: results[k] for k in ("split", "prompts", "seeds", "generation")},
        "methods": results["methods"],
        "policies": {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in policies.items()},
        "search": {m: {k: b.get(k) for k in ("names", "weights", "weight_vector", "aggregate", "scores", "points",
                                             "decoded", "wall_time_s", "history", "scale_invariant", "generation")}
                   for m, b in search.items()},
        "stages": stages, "environment": stage_data.get("environment"), "samples": samples,
        "bootstrap": results.get("bootstrap"),
        "differences_text": difference_sentences(results),
        "judges": judges_summary(results),
        "extra_sets": extra_sets_summary(results),
        "diversity": diversity_summary(results),
        "front": {k: front[k] for k in ("reference", "modes", "one_policy", "statements", "figure", "step", "w_max",
                                        "units", "linear", "sweep", "hypervolume_differences") if k in front}
                  if front else None,
        "tradeoff_background": _decoded_alike(results, search),
        "tables": {k: {"columns": c, "rows": r} for k, (c, r) in tables.items()},
        "figures": [str(p.relative_to(run)) for p in figs]}
    atomic_write_json(run / "results.json", summary)
    atomic_write_text(run / "report.md", render_markdown(run, summary, tables))
    return run / "report.md"


def render_markdown(run: Path, s: dict[str, Any], tables: dict[str, tuple[list[str], list[list[str]]]]) -> str:
    figs = set(s["figures"])
    objs = s["objectives"]
    ev = s["eval"]
    lines = [f"# EMORL run report: `{run.name}`", "",
             f"Model `{s['model']}`; objectives {', '.join(f'`{o}`' for o in objs)}; {ev['prompts']} prompts of the "
             f"`{ev['split']}` split; every method decoded the same way: {_decoding(ev)}. Rendered {s['rendered']}.",
             "", "## Comparison", "", markdown(*tables["comparison"]), "",
             "How to read it: each objective column is that reward's mean score on the test prompts (0 to 1, higher "
             "is better); *Mean reward* is their mean (the paper's \"mean reward\"). *Diversity-2* is distinct word "
             "bigrams ÷ all bigrams over all the method's replies; *Diversity-2 (ref.)* is the reference code's "
             "per-reply variant (distinct bigrams ÷ words). *Prompts consumed* and *Training time* are what training "
             "cost until each policy converged or spent its budget: EMORL, Model Soups and logit mixing all reuse the "
             "same K single-objective adapters, so they share that cost (sum over the adapters; per-adapter figures "
             "below) and add their own weight search. *Tokens/s* is decoding throughput on this machine; the mixing "
             "methods run all K adapters at every step. *Ended % (EOS or stop)* is the share of replies that ended "
             "before the token limit, at EOS or at a stop string (`generation.stop`, e.g. a sentence end); *EOS %* "
             "counts EOS alone (the model chose to stop; with stop strings, only before its first sentence end). "
             "The rest were cut at the limit."
             + (" Brackets are 95% confidence intervals from a paired bootstrap that resamples prompts, each with all "
                f"its seeds ({s['bootstrap']['n_units']} (prompt, seed) units, {s['bootstrap']['resamples']} "
                "resamples): every method saw the same prompts and random numbers." if s.get("bootstrap") else ""), ""]
    if "differences" in tables:
        lines += ["### Paired differences", "", markdown(*tables["differences"]), "",
                  "Each cell is the method's score minus the reference's on the same units, with its 95% CI; "
                  "*(n.s.)*: the CI holds 0, so the difference is not resolved by this evaluation.", "",
                  *[t + "\n" for t in s.get("differences_text", [])], ""]
    lines += judges_markdown(s) + kl_markdown(s) + extra_sets_markdown(s) + diversity_markdown(s)
    if "figures/results_scatter.png" in figs:
        lines += ["![prompts consumed vs mean reward](figures/results_scatter.png)", "",
                  "Each method's training data (x) against its test mean reward (y); up and to the left is better.",
                  ""]
    lines += ["## Training", "", markdown(*tables["training"]), "",
              "*Validation start/end* is the policy's validation reward before its first update and at its last "
              "validation (an EMORL adapter: its own objective's score; a baseline: the mean of all objectives).", ""]
    if "figures/training_curves.png" in figs:
        lines += ["![validation reward against prompts consumed](figures/training_curves.png)", ""]
    if "improvement" in tables:
        lines += ["Did training improve each objective? Each objective's test score under the base model and under its "
                  "own adapter alone (same prompts, same decoding):", "", markdown(*tables["improvement"]), ""]
    if s["search"]:
        lines += ["## Weights found", "", markdown(*tables["weights"]), "",
                  "Weights per adapter, as the search found them, under one rule for every mode: *base-anchored* "
                  "mixes (EMORL, logit mixing, Model Soups as task arithmetic) use them as given, each adapter's "
                  "shift of the base model at strength w_k (h0 + sum w_k (h_k - h0); W0 + sum w_k dW_k), searched "
                  "in [0, w_max]^K; *convex* mixes (EMORL convex, the parameter average, probability mixing) are "
                  "rescaled to sum 1, so only their ratios matter. Each method is evaluated exactly as its search "
                  "scored it. The aggregate is the mean objective score on the validation prompts the search "
                  "decoded."
                  + (" *: the search's best point was all zero (every point scored the same), which cannot be "
                     "decoded; evaluation used the best other point, shown." if any(r[0].endswith("*") for r in
                                                                                 tables["weights"][1]) else ""), ""]
        if "figures/search_modes.png" in figs:
            lines += ["![best validation aggregate per round and mode](figures/search_modes.png)", ""]
        views = [f for f in sorted(figs) if f.startswith("figures/search_") and f != "figures/search_modes.png"]
        if views:
            lines += ["Search views: " + ", ".join(f"[{Path(f).stem.removeprefix('search_')}]({f})" for f in views),
                      ""]
    if "figures/tradeoffs.png" in figs:
        lines += ["## Trade-offs", "", "![per-objective trade-offs](figures/tradeoffs.png)", "",
                  "Each panel is a pair of objectives, with each method's test scores (error bars: 95% CIs, paired "
                  "bootstrap over prompts). "
                  + ("The grey points are the weight points the EMORL (hidden-mixing) search scored on validation "
                     "prompts, with their Pareto front." if s.get("tradeoff_background") else
                     _no_overlay(s)), ""]
    if "front" in tables:
        fr = s["front"]
        ref = ", ".join(f"{o} {v:.3f}" for o, v in fr["reference"]["scores"].items())
        lines += ["## Pareto fronts", "", markdown(*tables["front"]), "",
                  f"Each mode decoded a lattice of weight points (step {fr.get('step')} over [0, {fr.get('w_max')}]^K, "
                  f"plus its searched point) on the evaluation's {fr.get('units')} (prompt, seed) units. Hypervolume "
                  f"is measured against the **base model's per-objective mean scores** ({ref}), with a bootstrap CI "
                  "over units (the reference resampled with them). A front *dominates* a one-policy method when one of "
                  "its points is at least as good in every objective and better in one.", "",
                  *[t + "\n" for t in fr.get("statements", [])], ""]
        if fr.get("figure"):
            lines += [f"![Pareto fronts]({fr['figure']})", ""]
    if s["samples"]:
        lines += ["## Sample replies", ""]
        for i, smp in enumerate(s["samples"], 1):
            lines += [f"**Prompt {i}.** {smp['prompt']}", ""]
            lines += [f"- *{label}*: {' '.join(reply.split()) or '(empty reply)'}"  # one line per reply
                      for label, reply in smp["replies"].items()]
            lines.append("")
    if s["stages"]:
        lines += ["## Stages", "", markdown(*tables["stages"]), ""]
        if s.get("environment"):
            e = s["environment"]
            lines += [f"Computed on {e['cpu']} ({e['device']}, {e['dtype']}, bf16 kernels: {e['bf16_kernels']}, "
                      f"{e['threads']} threads), torch {e['torch']}, transformers {e['transformers']}, peft "
                      f"{e['peft']}, Python {e['python']}.", ""]
    from emorl.report.human import human_lines

    lines += human_lines(run)  # the blind human A/B evaluation (RUN/judge/summary.json), when there is one
    lines += ["## Files", "", "`results.json` (every number above), `eval/results.json` (per-seed metrics), "
              "`eval/replies/<method>.jsonl` (every reply and its scores), `adapters/`, `baselines/`, "
              "`search/<mode>/`, `figures/`.", ""]
    return "\n".join(lines)
