"""The run report: ``RUN/report.md`` (the paper-shaped comparison table, training, weights, samples),
``RUN/results.json`` (every number in it) and ``RUN/figures/*.png``. ``emorl report RUN`` re-renders it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emorl.report.render import collect_policies, collect_search, search_result, write_report
    from emorl.report.tables import comparison_table, markdown

# imported on first use, so `emorl report --help` (emorl.report.cli) does not wait for matplotlib
_LAZY = {"collect_policies": "render", "collect_search": "render", "search_result": "render",
         "write_report": "render", "comparison_table": "tables", "markdown": "tables"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"emorl.report.{_LAZY[name]}"), name)
        globals()[name] = value  # cached; also rebinds a name its submodule's import shadowed (lora_bank)
        return value
    raise AttributeError(f"module 'emorl.report' has no attribute {name!r}")

__all__ = ["collect_policies", "collect_search", "comparison_table", "markdown", "search_result", "write_report"]
