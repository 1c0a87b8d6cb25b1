"""The run report: ``RUN/report.md`` (the paper-shaped comparison table, training, weights, samples),
``RUN/results.json`` (every number in it) and ``RUN/figures/*.png``. ``emorl report RUN`` re-renders it."""

from emorl.report.render import collect_policies, collect_search, search_result, write_report
from emorl.report.tables import comparison_table, markdown

__all__ = ["collect_policies", "collect_search", "comparison_table", "markdown", "search_result", "write_report"]
