"""The report's held-out-judge section: each method's judge scores, and its gain over the base model on the training
rewards beside its gain on the judges (paired, 95% CI), so a reader sees whether what training bought shows up on
scorers that training, the search and the router never saw (emorl.judges)."""

from __future__ import annotations

from typing import Any

from emorl.report.tables import fmt_pm, markdown


def _cell(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    lo, hi = d["ci95"]
    return f"{d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]{'' if d['resolved'] else ' (n.s.)'}"


def _sign(d: dict[str, Any] | None) -> int | None:
    """+1 / -1 for a resolved difference, 0 for an unresolved one, None when there is none."""
    if not d:
        return None
    return 0 if not d["resolved"] else (1 if d["mean"] > 0 else -1)


def judges_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """One row per method: each judge's mean [95% CI], their mean, and the training rewards' mean for comparison."""
    judges = list(results.get("judges") or [])
    if not judges:
        return None
    several = len(judges) > 1
    rows = []
    for m in results["methods"].values():
        s = m["summary"]
        rows.append([m["label"], *(fmt_pm(s.get(f"judge/{j}")) for j in judges),
                     *([fmt_pm(s.get("judge_mean"))] if several else []), fmt_pm(s.get("mean_reward"))])
    return ["Method", *judges, *(["Judges' mean"] if several else []), "Mean reward (training rewards)"], rows


def _judge_key(results: dict[str, Any]) -> str:
    judges = list(results.get("judges") or [])
    return "judge_mean" if len(judges) > 1 else f"judge/{judges[0]}"


def gains_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Per method: its paired gain over the base on the training rewards' mean and on the judges, and the verdict."""
    if not results.get("judges"):
        return None
    key = _judge_key(results)
    rows = []
    for m in results["methods"].values():
        d = (m.get("differences") or {}).get("base") or {}
        if not d:
            continue
        rows.append([m["label"], _cell(d.get("mean_reward")), _cell(d.get(key)),
                     verdict(_sign(d.get("mean_reward")), _sign(d.get(key)))])
    return (["Method", "Gain over base: training rewards", "Gain over base: judges", "Do the judges agree?"], rows) \
        if rows else None


def verdict(train: int | None, judge: int | None) -> str:
    if train is None or judge is None:
        return "–"
    word = {1: "up", 0: "level", -1: "down"}
    if train == judge:
        return f"yes (both {word[train]})"
    return f"no (training rewards {word[train]}, judges {word[judge]})"


def lead_sentence(results: dict[str, Any], method: str = "emorl", ref: str = "uniform") -> str | None:
    """Whether ``method``'s lead over ``ref`` on the training rewards holds on the judges, in words."""
    methods = results["methods"]
    if not results.get("judges") or method not in methods or ref not in methods:
        return None
    d = (methods[method].get("differences") or {}).get(ref) or {}
    tr, jd = d.get("mean_reward"), d.get(_judge_key(results))
    if not tr or not jd:
        return None
    a, b = methods[method]["label"], methods[ref]["label"]
    st, sj = _sign(tr), _sign(jd)
    if st == 1 and sj == 1:
        how = "holds on the judges"
    elif st == 1 and sj == 0:
        how = "is not resolved on the judges (their CI holds 0)"
    elif st == 1:
        how = "reverses on the judges"
    elif st == 0:
        how = ("is unresolved on the training rewards; the judges " +
               {1: f"prefer {a}", 0: "cannot tell them apart either", -1: f"prefer {b}"}[sj])
    else:
        how = f"is a deficit on the training rewards; the judges put {a} " + {1: "ahead", 0: "level", -1: "behind"}[sj]
    return (f"{a} − {b}: training rewards {_cell(tr)}, held-out judges {_cell(jd)}. {a}'s lead over {b} {how}."
            if st == 1 else f"{a} − {b}: training rewards {_cell(tr)}, held-out judges {_cell(jd)}: {a}'s "
                            f"difference {how}.")


def rank_agreement(results: dict[str, Any]) -> str | None:
    """Kendall's tau between the methods' order on the training rewards' mean and on the judges."""
    from scipy.stats import kendalltau

    if not results.get("judges"):
        return None
    key = _judge_key(results)
    pairs = [(m["summary"]["mean_reward"]["mean"], m["summary"][key]["mean"]) for n, m in results["methods"].items()
             if key in m["summary"] and not m.get("same_as")]
    if len(pairs) < 3:
        return None
    tau = kendalltau([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return (f"Across the {len(pairs)} methods, the judges order them like the training rewards with Kendall's "
            f"τ = {tau:+.2f} (1: the same order; 0: unrelated; −1: reversed).")


def judges_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """What results.json and the report keep of the judges: their specs, tables and sentences."""
    table = judges_table(results)
    if table is None:
        return None
    gains = gains_table(results)
    return {"names": list(results["judges"]), "specs": results.get("judge_specs"),
            "table": {"columns": table[0], "rows": table[1]},
            "gains": {"columns": gains[0], "rows": gains[1]} if gains else None,
            "sentences": [s for s in (lead_sentence(results), rank_agreement(results)) if s]}


def judges_markdown(s: dict[str, Any]) -> list[str]:
    """The report's section (empty when the run has no judges)."""
    j = s.get("judges")
    if not j:
        return []
    specs = j.get("specs") or {}
    what = "; ".join(f"`{n}` ({specs.get(n, {}).get('type', '?')})" for n in j["names"])
    lines = ["## Held-out judges", "",
             f"Scorers that training, the weight search and the router never saw: {what}. Each cell is the mean over "
             "the same replies as above, with its 95% CI.", "", markdown(j["table"]["columns"], j["table"]["rows"]), ""]
    if j.get("gains"):
        lines += ["Each method's gain over the base model (paired, same replies) on the training rewards and on the "
                  "judges; *(n.s.)*: the CI holds 0.", "", markdown(j["gains"]["columns"], j["gains"]["rows"]), ""]
    lines += [t + "\n" for t in j.get("sentences", [])]
    return lines
