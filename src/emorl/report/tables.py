"""Markdown tables of a run's report, built from plain dicts (``RUN/eval/results.json`` and the adapters'
``emorl.json``), so the same strings go into ``report.md`` and ``results.json``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def fmt_pm(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """``{"mean": m, "ci95": [lo, hi]}`` -> ``"m [lo, hi]"`` (the paired-bootstrap CI); without a CI,
    ``{"mean": m, "std": s}`` -> ``"m ± s"`` (``"m"`` alone when there was one seed)."""
    if not stat:
        return "–"
    if stat.get("ci95"):
        lo, hi = stat["ci95"]
        return f"{fmt(stat['mean'], digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"
    if stat.get("n", 1) <= 1:
        return fmt(stat["mean"], digits)
    return f"{fmt(stat['mean'], digits)} ± {fmt(stat['std'], digits)}"


def fmt_int(x: Any) -> str:
    return "–" if x is None else f"{int(round(x)):,}"


def fmt_seconds(x: Any) -> str:
    if x is None:
        return "–"
    return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"


def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(cell, columns)) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    return "\n".join([head, sep, *("| " + " | ".join(map(cell, r)) + " |" for r in rows)])


def comparison_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The paper-shaped table: one row per method; per-objective scores, their mean, Diversity-2 (both
    variants), reply length, training cost, search cost, decoding throughput."""
    objs = list(results["objectives"])
    kl = any("kl_per_token" in m["summary"] for m in results["methods"].values())  # eval.kl (emorl.kl)
    columns = ["Method", *objs, "Mean reward", *(["KL to base / token"] if kl else []), "Diversity-2",
               "Diversity-2 (ref.)", "Length (tokens)", "Prompts consumed", "Training time", "Search time / points",
               "Tokens/s"]
    rows = []
    for m in results["methods"].values():
        s = m["summary"]
        tr, se = m.get("training") or {}, m.get("search")
        search = f"{fmt_seconds(se.get('wall_time_s'))} / {se.get('points', '–')}" if se else "–"
        rows.append([m["label"], *(fmt_pm(s.get(f"score/{o}")) for o in objs), fmt_pm(s.get("mean_reward")),
                     *([fmt_pm(s.get("kl_per_token"), 4)] if kl else []),
                     fmt_pm(s.get("diversity2")), fmt_pm(s.get("diversity2_ref")), fmt_pm(s.get("length_tokens"), 1),
                     fmt_int(tr.get("prompts", 0)), fmt_seconds(tr.get("wall_time_s", 0.0)), search,
                     fmt_pm(s.get("tokens_per_s"), 0)])
    return columns, rows


def improvement_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Per objective: the base model's test score and the score of that objective's adapter alone (method
    ``single:<objective>``), decoded identically: the evidence that RL training improved each objective."""
    methods = results["methods"]
    base = methods.get("base")
    rows = []
    for o in results["objectives"]:
        single = methods.get(f"single:{o}")
        if not base or not single:
            continue
        b, a = base["summary"][f"score/{o}"], single["summary"][f"score/{o}"]
        d = (single.get("differences") or {}).get("base", {}).get(f"score/{o}")
        if d:  # the paired difference on the same units, with its CI
            lo, hi = d["ci95"]
            change = f"{d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] " + ("resolved" if d["resolved"] else "unresolved")
        else:
            change = f"{a['mean'] - b['mean']:+.3f}"
        rows.append([o, fmt_pm(b), fmt_pm(a), change, fmt_pm(single["summary"].get("mean_reward"))])
    if not rows:
        return None
    return ["Objective", "Base model", "Its adapter alone", "Change (paired, 95% CI)",
            "Adapter's mean reward (all objectives)"], rows


def training_table(policies: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per trained policy (EMORL's K adapters, then the baselines): cost, why it stopped, and its
    validation reward at the start and at the end (the evidence that each objective improved)."""
    columns = ["Policy", "Trained on", "Steps", "Prompts", "Wall time", "Stopped because", "Validation start",
               "Validation end", "Change"]
    rows = []
    for name, p in policies.items():
        first, last = p.get("first_value"), p.get("last_value")
        change = fmt(last - first, 3) if first is not None and last is not None else "–"
        if change not in ("–",) and not change.startswith("-"):
            change = "+" + change
        rows.append([name, ", ".join(p.get("objectives", [])), fmt_int(p.get("steps")), fmt_int(p.get("prompts")),
                     fmt_seconds(p.get("wall_time_s")), p.get("stop_reason") or "–", fmt(first), fmt(last), change])
    return columns, rows


def weights_table(search: dict[str, dict[str, Any]], used: dict[str, dict[str, float]] | None = None
                  ) -> tuple[list[str], list[list[str]]]:
    """One row per searched mode: the weights found (or, where evaluation had to use another point, those, marked
    with *), the validation score there, and the search's cost."""
    names: list[str] = []
    for b in search.values():
        names.extend(n for n in b.get("names", []) if n not in names)
    columns = ["Mode", *(f"w({n})" for n in names), "Validation aggregate", "Points (decoded)", "Search time"]
    rows = []
    for mode, b in search.items():
        w = b.get("weights", {})
        u = (used or {}).get(mode)
        star = ""
        if u and any(abs(u.get(n, 0.0) - w.get(n, 0.0)) > 1e-12 for n in names):
            w, star = u, "*"
        rows.append([mode + star, *(fmt(w.get(n)) if n in w else "–" for n in names), fmt(b.get("aggregate"), 4),
                     f"{b.get('points', '–')} ({b.get('decoded', '–')})", fmt_seconds(b.get("wall_time_s"))])
    return columns, rows


def stages_table(stages: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    columns = ["Stage", "Status", "Wall time"]
    rows = [[name, st.get("status", "–"), fmt_seconds(st.get("wall_time_s"))] for name, st in stages.items()]
    return columns, rows


def _hv(x: float) -> str:
    """A hypervolume: 4 decimals, or 2 significant digits below 0.001 (so a small positive one is not 0.0000)."""
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.1e}"


def front_table(front: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per mixing mode: lattice size, front size, hypervolume with its CI, and the one-policy methods its front
    dominates (from ``RUN/front/front.json``)."""
    rows = []
    for entry, m in front["modes"].items():
        lo, hi = m["hypervolume_ci95"]
        dom = [p["label"] for p in front["one_policy"].values() if p["fronts"][entry]["verdict"] == "dominated"]
        rows.append([entry, str(m["points"]), str(len(m["front"])), f"{_hv(m['hypervolume'])} [{_hv(lo)}, {_hv(hi)}]",
                     ", ".join(dom) or "none"])
    return ["Mode", "Lattice points", "Front points", "Hypervolume [95% CI]", "Dominates"], rows


def differences_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Each method's paired difference in mean reward (and per objective) to EMORL and to Uniform Weighted, with
    its 95% CI; a difference whose CI holds 0 is marked unresolved."""
    objs = list(results["objectives"])
    rows = []
    for m in results["methods"].values():
        for ref, d in (m.get("differences") or {}).items():
            if ref == "base":  # each adapter's gain over the base: the improvement table
                continue
            ref_label = results["methods"].get(ref, {}).get("label", ref)

            def cell(x: dict[str, Any] | None) -> str:
                if not x:
                    return "–"
                lo, hi = x["ci95"]
                return f"{x['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]{'' if x['resolved'] else ' (n.s.)'}"

            rows.append([m["label"], ref_label, cell(d.get("mean_reward")), *(cell(d.get(f"score/{o}")) for o in objs)])
    if not rows:
        return None
    return ["Method", "minus", "Mean reward", *objs], rows
