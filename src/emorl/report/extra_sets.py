"""The report's held-out prompt sets (``eval.extra_sets``): per set, each method's scores with 95% CIs and its paired
differences to EMORL and Uniform Weighted in words, apart from the test split's tables."""

from __future__ import annotations

from typing import Any

from emorl.evaluate_stats import difference_sentences
from emorl.report.tables import fmt_pm, markdown


def set_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    objs = list(res["objectives"])
    judges = list(res.get("judges") or [])
    columns = ["Method", *objs, "Mean reward", *judges, *(["Judges' mean"] if len(judges) > 1 else []),
               "Diversity-2", "Length (tokens)"]
    rows = []
    for m in res["methods"].values():
        s = m["summary"]
        rows.append([m["label"], *(fmt_pm(s.get(f"score/{o}")) for o in objs), fmt_pm(s.get("mean_reward")),
                     *(fmt_pm(s.get(f"judge/{j}")) for j in judges),
                     *([fmt_pm(s.get("judge_mean"))] if len(judges) > 1 else []),
                     fmt_pm(s.get("diversity2")), fmt_pm(s.get("length_tokens"), 1)])
    return columns, rows


def extra_sets_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """What results.json and the report keep of each set: its source, size, table and difference sentences."""
    sets = results.get("extra_sets")
    if not sets:
        return None
    out = {}
    for name, res in sets.items():
        cols, rows = set_table(res)
        sentences = difference_sentences(res)
        if res.get("judges"):
            key = "judge_mean" if len(res["judges"]) > 1 else f"judge/{res['judges'][0]}"
            sentences += [f"On the held-out judges: {t}" for t in difference_sentences(res, key)]
        out[name] = {"spec": res.get("spec"), "prompts": res["prompts"], "seeds": res["seeds"],
                     "table": {"columns": cols, "rows": rows}, "sentences": sentences}
    return out


def extra_sets_markdown(s: dict[str, Any]) -> list[str]:
    sets = s.get("extra_sets")
    if not sets:
        return []
    lines = ["## Held-out prompt sets", "",
             "The same methods, decoded the same way with the same seeds, on prompts outside the data's splits; "
             "brackets are 95% CIs from the paired bootstrap over these prompts.", ""]
    for name, x in sets.items():
        spec = x.get("spec") or {}
        src = spec.get("source") or spec.get("path") or "?"
        lines += [f"### `{name}`: {x['prompts']} prompts from `{src}`", "", markdown(x["table"]["columns"],
                                                                                     x["table"]["rows"]), ""]
        lines += [t + "\n" for t in x.get("sentences", [])]
    return lines
